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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from freshet.demo.plan import DemoError

RUNS_KEPT = 5                 # earlier run directories kept under <data dir>/demo
STREAM_APP_ID = "freshet-stream"

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
    required: bool
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])


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
