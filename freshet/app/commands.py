"""The application shell's own subcommands: stack, up, apply, features, config.

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
    from freshet import feature_versions

    features.apply(settings)
    store = features.feature_store(settings)
    registry = features.load_registry(settings, store)
    for view in registry.views.values():
        print(f"{view.name} v{view.version}: {len(view.aggregations)} features from topic {view.topic!r}, "
              f"keys {', '.join(view.join_keys)}, tile {view.tile_s}s, lateness {view.lateness_s}s")
        pending = feature_versions.pending(store, view.name)
        if pending is not None:
            print(f"  v{pending.number} pending: " + "; ".join(feature_versions.diff(view, pending.spec)))
            print(f"  restart the stream workers: they build v{pending.number} from the raw log and make it active "
                  f"once every partition is built; until then v{view.version} serves "
                  f"('freshet features history {view.name}')")
    if args.model_store:
        create_model_store(settings)
        print("model store ready")
    return 0


def _version_number(text: str) -> int:
    """A version as "2" or "v2".

    >>> _version_number("v2"), _version_number("0")
    (2, 0)
    """
    digits = text[1:] if text[:1] in ("v", "V") else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (like 2 or v2)")
    return int(digits)


def cmd_features(args, settings: Settings) -> int:
    from freshet import feature_versions as fv
    from freshet import features

    store = features.feature_store(settings)
    if args.action == "history":
        names = [args.view] if args.view else sorted(features.load_registry(settings, store).views)
        for name in names:
            versions = fv.history(store, name)
            built = _built_partitions(settings, args.app_id, versions)
            print(name)
            for v in versions:
                created = v.created.strftime("%Y-%m-%d %H:%M:%S") if v.created else "-"
                progress = f", built {built[v.number]}/{settings.kafka_partitions} partitions" \
                    if v.number in built and v.state == fv.PENDING else ""
                print(f"  v{v.number}  {v.state:<10} {created}  {len(v.spec.aggregations)} features, "
                      f"stored as {v.stored_name}, fingerprint {v.spec.fingerprint}{progress}")
        return 0
    versions = {v.number: v for v in fv.history(store, args.view)}
    if args.action == "diff":
        active = next(n for n, v in versions.items() if v.state == fv.ACTIVE)
        a = active if args.a is None else args.a
        b = max(versions) if args.b is None else args.b
        for n in (a, b):
            if n not in versions:
                raise CliError(f"{args.view} has no version {n}; it has {', '.join(f'v{k}' for k in versions)}")
        lines = fv.diff(versions[a].spec, versions[b].spec)
        print(f"{args.view} v{a} -> v{b}:" + ("" if lines else " the same definition"))
        for line in lines:
            print(f"  {line}")
        return 0
    if args.to not in versions:
        raise CliError(f"{args.view} has no version {args.to}; it has {', '.join(f'v{k}' for k in versions)}")
    number = fv.revert(store, args.view, args.to)
    if number is None:
        print(f"{args.view}: the active version already computes what v{args.to} does; nothing to do")
        return 0
    print(f"{args.view}: v{number} registered with the definition of v{args.to}, pending; restart the stream "
          f"workers to build it (the active version serves until it is complete). Edit feature_repo/ to match, or "
          f"the next 'freshet apply' registers the file's definition again.")
    return 0


def _built_partitions(settings: Settings, group: str, versions) -> dict[int, int]:
    """Version -> partitions the stream has built (a Redis set per version); empty without Redis."""
    from freshet import feature_versions as fv
    from freshet.endpoints import redis_client

    try:
        client = redis_client(resolve_endpoints(settings))
        return {v.number: client.scard(fv.built_key(group, v.stored_name)) for v in versions if v.number}
    except Exception:  # noqa: BLE001 - history works without Redis; it only lacks the progress
        return {}


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
    from freshet.offline_store import create_buckets

    created = create_buckets(settings)  # the object store's buckets, where the settings name any
    if created:
        print(f"created bucket(s) {', '.join(created)}")
    ModelRegistry(settings, publish_events=False).models()


class WhatNext:
    """What `freshet up` tells a new user once everything runs: where the API, the dashboard,
    the credentials and the logs are, how to publish events, read a feature and score; and,
    once, when the first (bootstrap) model is served."""

    def __init__(self, settings: Settings, log_dir: str, sample_feature: str, token_hint: tuple[str, str]):
        self.settings = settings
        self.api = f"http://{settings.http_host}:{settings.http_port}"
        self.log_dir = log_dir
        self.sample_feature = sample_feature
        self.token_where, self.token_shell = token_hint  # where the token lives; a shell word that yields it
        self.model_served = False

    def text(self) -> str:
        script = os.path.join(os.path.dirname(sys.executable), "freshet")
        freshet = script if os.path.isfile(script) else f"{sys.executable} -m freshet.cli"
        auth = f'-H "Authorization: Bearer {self.token_shell}"'
        feature = ('{"features": ["%s"], "entities": {"card_id": ["card0042"]}}' % self.sample_feature)
        predict = '{"card_id": "card0042", "merchant_id": "m042", "amount": 42.5}'
        return "\n".join([
            "",
            f"  API        {self.api}   (OpenAPI docs at {self.api}/docs)",
            f"  dashboard  {self.api}/ui   (log in with the API token)",
            f"  API token  {self.token_where}",
            f"  logs       {self.log_dir}",
            "",
            "Publish sample events (card transactions at 200/s for 5 minutes, labels 30 s later):",
            f"  {freshet} --data-dir {self.settings.data_path} produce --rate 200 --duration 300",
            "Read a card's features:",
            f"  curl -s {auth} {self.api}/get-online-features -d '{feature}'",
            "Score a transaction:",
            f"  curl -s {auth} {self.api}/predict -d '{predict}'",
            f"Model: none served yet. The retrain worker trains the bootstrap model of "
            f"'{self.settings.model_name}' once labelled events exist (it looks every 30 s);",
            f"until then /predict answers 503 (check: curl {self.api}/ready). This terminal says when one is served.",
            "",
        ])

    def check_model(self) -> str | None:
        """A line to print the first time /ready says a model is served, else None."""
        if self.model_served:
            return None
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(self.api + "/ready", timeout=1) as resp:
                doc = json.loads(resp.read())
        except Exception:  # noqa: BLE001 - 503 until a model is served, or not listening yet
            return None
        model = doc.get("model") or {}
        if not doc.get("ready") or not model:
            return None
        self.model_served = True
        return (f"model {model.get('name')} version {model.get('version')} is served: /predict answers now "
                f"(dashboard {self.api}/ui)")


def _token_hint(settings: Settings) -> tuple[str, str]:
    """Where the API token lives and a shell word that yields it; the token file is written now
    (0600) when needed, before `serve` starts, so both read the same one."""
    from freshet.serving.auth import resolve_token, token_path

    if settings.api_token:
        return "FRESHET_API_TOKEN (from your environment)", "$FRESHET_API_TOKEN"
    resolve_token(settings)
    path = token_path(settings)
    return f"{path} (mode 0600; or set FRESHET_API_TOKEN)", f"$(cat {path})"


def _what_next(settings: Settings, log_dir: str, hint: tuple[str, str]) -> WhatNext:
    from freshet import features

    registry = features.load_registry(settings)
    card_views = [v for v in registry.views.values() if "card_id" in v.join_keys] or list(registry.views.values())
    sample = f"{card_views[0].name}:{card_views[0].feature_names[0]}"
    return WhatNext(settings, log_dir, sample, hint)


def cmd_up(args, settings: Settings) -> int:
    from freshet import features
    from freshet.app.stack import EmbeddedStack

    if settings.redis_cluster == "on":
        raise CliError("FRESHET_REDIS_CLUSTER=on: 'freshet up' runs the embedded stack, one Redis and no cluster; "
                       "unset it, or run 'freshet stream' and 'freshet serve' against your cluster")
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
        token_hint = _token_hint(settings)
        env = {**os.environ, **settings.to_env()}
        for name in components:
            out = open(os.path.join(e.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "freshet.cli", *UP_COMPONENTS[name]], env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
            print(f"started {name} (pid {procs[-1].pid}, log {out.name})", flush=True)
        what_next = _what_next(settings, e.log_dir, token_hint)
        print("freshet is up; Ctrl-C stops everything", flush=True)
        print(what_next.text(), flush=True)
        next_look = 0.0
        while not stopping:
            for p, name in zip(procs, components):
                if p.poll() is not None:
                    raise CliError(f"component {name} exited with code {p.returncode}; see {e.log_dir}/{name}.log")
            if not what_next.model_served and time.monotonic() >= next_look:
                next_look = time.monotonic() + 2.0
                line = what_next.check_model()
                if line:
                    print(line, flush=True)
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
    p.add_argument("--model-store", action="store_true",
                   help="also create the MLflow model store, as 'freshet up' does before its components start "
                        "(components starting together on a fresh store would race to create it)")
    handlers["apply"] = cmd_apply

    p = sub.add_parser("features", help="versions of the feature views: history, diff, revert",
                       description="A change to a feature view's definition, registered by 'freshet apply', is a "
                                   "new version: the stream workers build it from the raw log when they start and "
                                   "make it active once every partition is built; reads without a version get the "
                                   "active one, 'view@vN:feature' a given one.")
    actions = p.add_subparsers(dest="action", required=True, metavar="{history,diff,revert}")
    a = actions.add_parser("history", help="every version of a view (or of every view) and its state")
    a.add_argument("view", nargs="?", help="a stream feature view (default: all)")
    a.add_argument("--app-id", default="freshet-stream",
                   help="the stream workers' consumer group, for the build progress (default: %(default)s)")
    a = actions.add_parser("diff", help="what changes between two versions of a view")
    a.add_argument("view")
    a.add_argument("a", nargs="?", type=_version_number, help="from version (default: the active one)")
    a.add_argument("b", nargs="?", type=_version_number, help="to version (default: the newest)")
    a = actions.add_parser("revert", help="register an older version's definition again, as the newest version",
                           description="The definition of version TO becomes the newest version, pending: the "
                                       "stream workers build it when they restart and switch to it when complete. "
                                       "Edit feature_repo/ to match, or the next 'freshet apply' registers the "
                                       "file's definition again.")
    a.add_argument("view")
    a.add_argument("--to", type=_version_number, required=True, metavar="N", help="the version to go back to")
    handlers["features"] = cmd_features

    p = sub.add_parser("config", help="print the effective settings (secrets masked)",
                       epilog="\n".join(f"{n} (default {d!r})" for n, d in settings_table()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    handlers["config"] = cmd_config
