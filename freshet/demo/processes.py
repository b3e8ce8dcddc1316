"""The demo's processes: a fresh run directory per run, and each freshet component as a child
process that dies with the demo and is stopped in order.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import orjson

from freshet.demo.plan import DemoError
from freshet.demo.record import DemoRecord
from freshet.settings import Settings

RUNS_KEPT = 5                 # earlier run directories kept under <data dir>/demo
COMPONENTS = ("stream", "serve", "monitor", "retrain")  # the system; the producer drives it
STREAM_APP_ID = "freshet-stream"
PRODUCE_SUMMARY = "produce.json"  # the producer's stdout: its summary is the last line

# The installed console script, as a user would run it; `python -m freshet.cli` otherwise.
_SCRIPT = Path(sys.executable).with_name("freshet")
FRESHET = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "freshet.cli"]


# Components whose Kafka reads need no sub-second latency poll the broker less often: on the
# embedded broker every waiting fetch costs CPU (one idle consumer of 28 partitions: ~17% of
# a core at 20 ms, ~5% at 100 ms, measured here), CPU the stream worker needs for freshness.
RELAXED_FETCH = ("serve", "monitor", "retrain", "bootstrap")
RELAXED_FETCH_MS = 200


# --- run directories ----------------------------------------------------------------------

class RunDirectory:
    """A fresh directory per demo run under <data dir>/demo, so nothing of an earlier run
    (stack.json, Feast registry, MLflow database, offline logs, topics) can leak into this one.

    A lock file keeps two demos from sharing a data dir; stacks an earlier, killed demo left
    running are stopped; only the newest runs are kept.
    """

    def __init__(self, data_dir: Path):
        self.base = data_dir / "demo"
        self.path: Path | None = None
        self._lock = None
        self.notes: list[str] = []

    def create(self) -> Path:
        from freshet.app.stack import EmbeddedStack

        try:
            self.base.mkdir(parents=True, exist_ok=True)
            lock = open(self.base / ".lock", "a+")  # noqa: SIM115 - held for the whole run
        except OSError as exc:
            raise DemoError(f"cannot write the demo's data dir {self.base}: {exc}; pass --data-dir") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            raise DemoError(f"another freshet demo (pid {owner}) is running with data dir {self.base.parent}; "
                            "wait for it or pass another --data-dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        for old in self.runs():
            stack = EmbeddedStack(old)
            if stack.status() is not None:  # left by a demo that was killed: nobody else owns it
                stack.stop()
                self.notes.append(f"stopped the embedded stack an earlier demo left running in {old}")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = self.base / f"run-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = self.base / f"run-{stamp}-{n}"
        (path / "logs").mkdir(parents=True)
        self.path = path
        for old in self.runs()[:-RUNS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def runs(self) -> list[Path]:
        return sorted(p for p in self.base.glob("run-*") if p.is_dir())

    def link_latest(self) -> None:
        """<data dir>/demo/latest -> this run (replaced atomically)."""
        if self.path is None:
            return
        tmp = self.base / f".latest-{os.getpid()}"
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.path.name)
            os.replace(tmp, self.base / "latest")

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock, fcntl.LOCK_UN)
                self._lock.close()
            self._lock = None


# --- component processes ------------------------------------------------------------------

@dataclass
class Component:
    """One freshet subcommand running as a child process of the demo."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])


class Supervisor:
    """The run's component processes: each started with the run's settings and its own log,
    watched for an exit that ends the demo, and stopped newest first.

    `components` must keep running until the end (the producer until its traffic is sent);
    `bootstrap` is the latest `freshet retrain --bootstrap`, which is expected to exit.
    Their fate is kept in `record.components`.
    """

    def __init__(self, run_dir: Path, settings: Settings, record: DemoRecord, say: Callable[[str], None]):
        self.run_dir = run_dir
        self.settings = settings
        self.record = record
        self.say = say
        # the caller's environment minus its FRESHET_* settings: the run's own take their place
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("FRESHET_") or k == "FRESHET_TRANSACTIONS_TOPIC"}
        self.env.update(settings.to_env())
        self.components: list[Component] = []
        self.producer: Component | None = None
        self.bootstrap: Component | None = None
        self.history: Component | None = None

    # -- starting ------------------------------------------------------------------

    def start(self, argv: list[str], name: str) -> Component:
        """`freshet <argv>` as a component that must keep running."""
        c = self._spawn(argv, name)
        self.components.append(c)
        return c

    def start_producer(self, argv: list[str]) -> Component:
        """`freshet produce <argv>`, its summary written to PRODUCE_SUMMARY."""
        self.producer = self._spawn(["produce", *argv], "produce", stdout_name=PRODUCE_SUMMARY)
        self.components.append(self.producer)
        return self.producer

    def run_history(self, argv: list[str]) -> Component:
        """`freshet produce <argv>` publishing the history; expected to exit (0) once it is sent."""
        self.history = self._spawn(["produce", *argv], "history", stdout_name="history.json")
        return self.history

    def start_bootstrap(self, extra: list[str] | None = None) -> Component:
        """`freshet retrain --bootstrap`: trains the first model and exits."""
        self.bootstrap = self._spawn(["retrain", "--bootstrap", *(extra or [])], "bootstrap")
        return self.bootstrap

    def _spawn(self, argv: list[str], name: str, stdout_name: str | None = None) -> Component:
        env = self.env
        if name in RELAXED_FETCH:
            env = {**env, "FRESHET_KAFKA_FETCH_MAX_WAIT_MS": str(RELAXED_FETCH_MS)}
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        out = open(self.run_dir / stdout_name, "wb") if stdout_name else log  # noqa: SIM115
        # own session: a Ctrl-C in the terminal reaches only the demo, which stops children in order;
        # PDEATHSIG: they still die if the demo itself is killed
        proc = subprocess.Popen([*FRESHET, *argv], env=env, stdout=out,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_child_setup)
        log.close()
        if out is not log:
            out.close()
        self.say(f"[{self.record.clock()}] started {name} (pid {proc.pid}, log logs/{log_path.name})")
        return Component(name, proc, log_path)

    # -- watching ------------------------------------------------------------------

    def check(self) -> None:
        """Raise DemoError, with the last lines of its log, when a component has exited (the
        producer may, once done)."""
        status = self.record.components
        for c in self.components:
            if status.get(c.name, "").startswith("exited"):
                continue
            code = c.proc.poll()
            if code is None or c is self.producer and code == 0:
                continue
            status[c.name] = f"exited with code {code}"
            raise DemoError(f"{c.name} exited with code {code}; last lines of {c.log_path}:\n{c.tail()}")

    def wait_for_stream(self, timeout: float = 90.0) -> None:
        """Traffic starts once the stream worker has joined its group: otherwise freshness
        would measure the worker's start-up, not the system."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({**self.settings.kafka_client_config(), "log_level": 0})
        started = time.monotonic()
        self.say("[setup] waiting for the stream worker to join its consumer group ...")
        while time.monotonic() - started < timeout:
            self.check()
            try:
                desc = admin.describe_consumer_groups([STREAM_APP_ID])[STREAM_APP_ID].result(timeout=5)
                if str(desc.state).endswith("STABLE"):
                    self.say(f"[setup] stream worker ready after {time.monotonic() - started:.1f}s")
                    return
            except Exception:  # noqa: BLE001 - not there yet
                pass
            time.sleep(0.5)
        self.record.problem(f"the stream worker had not joined its group after {timeout:.0f}s; traffic "
                            "started anyway (early freshness includes its start-up)")

    def pids(self) -> dict[str, int]:
        """The demo's own pid and its children's, by name."""
        pids = {"demo": os.getpid(), **{c.name: c.proc.pid for c in self.components}}
        if self.bootstrap is not None:
            pids[f"bootstrap-{self.bootstrap.proc.pid}"] = self.bootstrap.proc.pid
        return pids

    # -- stopping ------------------------------------------------------------------

    def stop_producer(self, hurry: threading.Event) -> None:
        """SIGINT: the producer publishes the labels still pending and prints its summary."""
        if self.producer is not None and self.producer.running:
            stop_components([self.producer], grace=15.0, hurry=hurry, first_signal=signal.SIGINT)

    def stop(self, hurry: threading.Event) -> list[str]:
        """Stop every child, newest first; the names of those killed after 10 s."""
        return stop_components(self._children()[::-1], grace=10.0, hurry=hurry)

    def still_running(self) -> list[str]:
        return [f"{c.name} (pid {c.proc.pid})" for c in self._children() if c.proc.poll() is None]

    def mark_ran(self) -> None:
        """At the end: every component that was started and did not exit early "ran"."""
        status = self.record.components
        for c in self.components:
            if c.name in status and not status[c.name].startswith("exited"):
                status[c.name] = "ran"

    def _children(self) -> list[Component]:
        return [c for c in [self.history, self.bootstrap, *self.components] if c is not None]


def _child_setup() -> None:
    """In each component, before exec: die with the demo, and take SIGINT again (a background
    shell job inherits it ignored; the demo stops the producer with SIGINT)."""
    from freshet.app.stack import _die_with_parent as die

    die()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_components(components: list[Component], grace: float = 10.0,
                    hurry: threading.Event | None = None, first_signal: int = signal.SIGTERM) -> list[str]:
    """Signal every running component, wait up to `grace` s in all, then SIGKILL the rest."""
    killed = []
    for c in components:
        if c.running:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(first_signal)
    deadline = time.monotonic() + grace
    for c in components:
        while c.running and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            time.sleep(0.05)
        if c.running:
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            killed.append(c.name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(timeout=5)
    return killed


def producer_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary `freshet produce` printed last, once it has."""
    try:
        lines = (run_dir / PRODUCE_SUMMARY).read_text().strip().splitlines()
        return orjson.loads(lines[-1]) if lines else None
    except (OSError, orjson.JSONDecodeError):
        return None
