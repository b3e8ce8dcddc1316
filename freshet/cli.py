"""The `freshet` command: the composition root, one subcommand per component.

Each layer registers its own subcommands (`register(sub, handlers)`); handlers import
their engines lazily so `freshet --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from typing import Callable

from freshet.errors import CliError
from freshet.settings import SettingsError, load_settings

log = logging.getLogger("freshet")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("faust", "aiokafka", "mode", "feast", "urllib3", "httpx", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# --- parser ---------------------------------------------------------------------

def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    parser = argparse.ArgumentParser(
        prog="freshet",
        description="Streaming feature store and online drift monitor. Settings come from FRESHET_* "
                    "env vars (see 'freshet config').",
    )
    parser.add_argument("--version", action="version", version=f"freshet {version('freshet')}")
    parser.add_argument("--data-dir", help="overrides FRESHET_DATA_DIR")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="overrides FRESHET_LOG_LEVEL")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    handlers: dict[str, Callable] = {}

    for register in _component_registrars():
        register(sub, handlers)
    return parser, handlers


def _component_registrars() -> list[Callable]:
    """Subcommands owned by each layer's package, each adding its own parsers."""
    from freshet.app import commands
    from freshet.demo import cli as demo_cli
    from freshet.monitor import cli as monitor_cli
    from freshet.serving import cli as serving_cli
    from freshet.stream import cli as stream_cli
    from freshet.training import cli as training_cli

    return [commands.register, stream_cli.register, serving_cli.register, monitor_cli.register,
            training_cli.register, demo_cli.register]


# the commands that read or write the offline logs
OFFLINE_STORE_USERS = {"stream", "backfill", "training-set", "retrain", "consistency", "up", "demo"}


def _unchecked(target=None, **_options):
    """typeguard's `typechecked` as a no-op (`@_unchecked` and `@_unchecked(...)` alike)."""
    return target if target is not None else _unchecked


def skip_feast_typechecks() -> None:
    """Import Feast without typeguard's instrumentation: ~1.3 s instead of ~4 s per process.

    Feast decorates its API with typeguard's `@typechecked`, which at import re-parses and
    recompiles the source of every decorated function (about 240 of them): most of every
    component's start. freshet's components only read the registry, whose objects Feast built
    and checked when they were applied, so they skip the checks. `freshet apply`, which runs the
    user's feature_repo/ definitions, does not come through here and keeps them
    (freshet/feature_apply.py runs in a process of its own).
    """
    if "feast" in sys.modules:
        return
    import typeguard

    typeguard.typechecked = _unchecked


def main(argv: list[str] | None = None) -> int:
    skip_feast_typechecks()
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        settings = load_settings(data_dir=args.data_dir, log_level=args.log_level)
        _setup_logging(settings.log_level)
        if args.command in OFFLINE_STORE_USERS:
            from freshet.offline_store import OfflineStore

            OfflineStore.of(settings)  # an object store is reached once here: bad settings stop the start
        return handlers[args.command](args, settings) or 0
    except (SettingsError, CliError) as exc:
        print(f"freshet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for known failure kinds, traceback otherwise
        from freshet.kafka import KafkaUnavailable
        from freshet.app.stack import StackError
        from freshet.features import FeatureRepoError

        if isinstance(exc, (KafkaUnavailable, StackError, FeatureRepoError)):
            print(f"freshet: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
