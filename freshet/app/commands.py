"""The application shell's own subcommands: stack, up, apply, config.

`up` runs every component beside the embedded stack, each its own process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from freshet.endpoints import resolve_endpoints
from freshet.errors import CliError
from freshet.settings import Settings, settings_table


# --- stack -------------------------------------------------------------------

def cmd_stack(args, settings: Settings) -> int:
    from freshet.features import feast_env
    from freshet.app.stack import EmbeddedStack

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
    # served features vs their recomputation from the raw log (FRESHET_CONSISTENCY_*)
    "consistency": ["consistency"],
}


def create_model_store(settings: Settings) -> None:
    """Create the MLflow store before components start: serve and retrain creating a fresh
    sqlite schema at the same moment crash each other (alembic's tmp table exists)."""
    from freshet.models import ModelRegistry

    ModelRegistry(settings, publish_events=False).models()


def cmd_up(args, settings: Settings) -> int:
    from freshet import features
    from freshet.app.stack import EmbeddedStack

    stack = EmbeddedStack(settings.data_path, kafka_port=args.kafka_port, redis_port=args.redis_port)
    procs: list[subprocess.Popen] = []
    components = list(UP_COMPONENTS)
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


def _add_stack_ports(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kafka-port", type=int, default=0, help="broker port (default: a free one)")
    p.add_argument("--redis-port", type=int, default=0, help="Redis port (default: a free one)")


def register(sub: argparse._SubParsersAction, handlers: dict) -> None:
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
