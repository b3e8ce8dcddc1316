"""The `freshet` command: one entry point, one subcommand per component.

Each subcommand imports its component lazily so `freshet --help` stays fast and a
broken optional component cannot stop the others from starting.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Callable

from freshet.settings import Settings, SettingsError, load_settings, settings_table

log = logging.getLogger("freshet")


class CliError(RuntimeError):
    """A user-facing failure: printed as one line, exit code 2."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("faust", "aiokafka", "mode", "feast", "urllib3", "httpx", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def resolve_endpoints(settings: Settings) -> Settings:
    """Fill empty Kafka/Redis endpoints from a running embedded stack of this data dir."""
    if settings.kafka_bootstrap_servers and settings.redis_url:
        return settings
    from freshet.stack import EmbeddedStack

    running = EmbeddedStack(settings.data_path).status()
    if running is None:
        missing = [n for n, v in (("FRESHET_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                                  ("FRESHET_REDIS_URL", settings.redis_url)) if not v]
        raise CliError(
            f"{' and '.join(missing)} not set and no embedded stack runs for {settings.data_path}; "
            "run 'freshet stack start' (or 'freshet up') or set them to your Kafka/Redis"
        )
    return settings.with_endpoints(settings.kafka_bootstrap_servers or running.kafka,
                                   settings.redis_url or running.redis_url)


# --- stack -------------------------------------------------------------------

def cmd_stack(args, settings: Settings) -> int:
    from freshet.features import feast_env
    from freshet.stack import EmbeddedStack

    stack = EmbeddedStack(settings.data_path, kafka_port=args.kafka_port, redis_port=args.redis_port)
    if args.action == "start":
        e = stack.start(detach=True)
        print(f"kafka  {e.kafka}\nredis  {e.redis_url}\nlogs   {e.log_dir}")
        print(f"stop with: freshet stack stop   (data dir {settings.data_path})")
    elif args.action == "status":
        e = stack.status()
        if e is None:
            print(f"no embedded stack runs for {settings.data_path}")
            return 1
        print(f"kafka  {e.kafka} (pid {e.kafka_pid})\nredis  {e.redis_url} (pid {e.redis_pid})\nlogs   {e.log_dir}")
    elif args.action == "stop":
        print("stopped" if stack.stop() else f"no embedded stack was running for {settings.data_path}")
    elif args.action == "env":
        e = stack.status()
        if e is None:
            raise CliError(f"no embedded stack runs for {settings.data_path}; run 'freshet stack start'")
        for k, v in {"FRESHET_KAFKA_BOOTSTRAP_SERVERS": e.kafka, "FRESHET_REDIS_URL": e.redis_url,
                     **feast_env(settings.with_endpoints(e.kafka, e.redis_url))}.items():
            print(f"export {k}={v}")
    return 0


def cmd_apply(args, settings: Settings) -> int:
    from freshet import features

    settings = resolve_endpoints(settings)
    features.apply(settings)
    registry = features.load_registry(settings)
    for view in registry.views.values():
        print(f"{view.name}: {len(view.aggregations)} features from topic {view.topic!r}, "
              f"keys {', '.join(view.join_keys)}, tile {view.tile_s}s, lateness {view.lateness_s}s")
    return 0


def cmd_config(args, settings: Settings) -> int:
    for name, value in settings.public_view().items():
        print(f"FRESHET_{name.upper():32} {value}")
    return 0


# --- up ------------------------------------------------------------------------

# Components `freshet up` runs beside the stack, each its own process (those this
# build has).
UP_COMPONENTS = {
    "stream": ["stream"],
    "serve": ["serve"],
    "monitor": ["monitor"],
    # a fresh system has no model: train one as soon as labelled data exists
    "retrain": ["retrain", "--bootstrap-every", "30"],
}


def create_model_store(settings: Settings) -> None:
    """Create the MLflow store before components start: serve and retrain creating a fresh
    sqlite schema at the same moment crash each other (alembic's tmp table exists)."""
    from serving.models import ModelRegistry

    ModelRegistry(settings, publish_events=False).models()


def cmd_up(args, settings: Settings) -> int:
    from freshet import features
    from freshet.stack import EmbeddedStack

    stack = EmbeddedStack(settings.data_path, kafka_port=args.kafka_port, redis_port=args.redis_port)
    procs: list[subprocess.Popen] = []
    components = [c for c in UP_COMPONENTS if c in build_parser()[1]]
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    e = stack.start()
    try:
        settings = settings.with_endpoints(e.kafka, e.redis_url)
        print(f"kafka {e.kafka}   redis {e.redis_url}   logs {e.log_dir}", flush=True)
        features.apply(settings)
        create_model_store(settings)
        env = {**os.environ, **settings.to_env()}
        for name in components:
            out = open(os.path.join(e.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "freshet.cli", *UP_COMPONENTS[name]], env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
            print(f"started {name} (pid {procs[-1].pid}, log {out.name})", flush=True)
        print("freshet is up; Ctrl-C stops everything", flush=True)
        while not stopping:
            for p, name in zip(procs, components):
                if p.poll() is not None:
                    raise CliError(f"component {name} exited with code {p.returncode}; see {e.log_dir}/{name}.log")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.stop()
        print("stopped", flush=True)
    return 0


# --- parser ---------------------------------------------------------------------

def _add_stack_ports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka-port", type=int, default=0, help="broker port (default: a free one)")
    p.add_argument("--redis-port", type=int, default=0, help="Redis port (default: a free one)")


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

    p = sub.add_parser("stack", help="start/stop/status of the embedded Kafka and Redis",
                       description="The embedded Kafka-protocol broker and Redis-protocol server, "
                                   "started in the background for this data dir.")
    p.add_argument("action", choices=["start", "stop", "status", "env"],
                   help="env prints export lines for the Feast CLI and other tools")
    _add_stack_ports(p)
    handlers["stack"] = cmd_stack

    p = sub.add_parser("up", help="the whole system on the embedded stack, until Ctrl-C")
    _add_stack_ports(p)
    handlers["up"] = cmd_up

    p = sub.add_parser("apply", help="register feature_repo/ in the Feast registry (feast apply)")
    handlers["apply"] = cmd_apply

    p = sub.add_parser("config", help="print the effective settings (secrets masked)",
                       epilog="\n".join(f"{n} (default {d!r})" for n, d in settings_table()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    handlers["config"] = cmd_config

    for register in _component_registrars():
        register(sub, handlers)
    return parser, handlers


def _component_registrars() -> list[Callable]:
    """Subcommands owned by the component packages, each adding its own parser."""
    out = []
    for module_name in ("stream.cli", "serving.cli", "monitor.cli", "freshet.demo"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        out.append(module.register)
    return out


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        settings = load_settings(data_dir=args.data_dir, log_level=args.log_level)
        _setup_logging(settings.log_level)
        return handlers[args.command](args, settings) or 0
    except (SettingsError, CliError) as exc:
        print(f"freshet: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for known failure kinds, traceback otherwise
        from freshet.kafka import KafkaUnavailable
        from freshet.stack import StackError
        from freshet.features import FeatureRepoError

        if isinstance(exc, (KafkaUnavailable, StackError, FeatureRepoError)):
            print(f"freshet: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
