"""`freshet serve --workers N`: N serving processes sharing one port, and their supervisor.

Each worker binds its own SO_REUSEPORT socket, so the kernel spreads new connections
evenly over the workers, and has its own Redis, Kafka and MLflow clients. The
supervisor starts them, restarts one that dies after it has served, and stops them
all on Ctrl-C or SIGTERM; a worker also exits when the supervisor itself dies.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from freshet.settings import Settings

log = logging.getLogger("freshet.serving.workers")

# a worker that exits sooner than this after starting failed to start: restarting it would loop
STARTUP_GRACE_S = 60.0
STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT, not yet listening.

    Connections reach a socket only once it listens, and uvicorn listens after the
    app's start-up: a worker still loading its model is not handed any.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _exit_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGTERM this process when the supervisor dies (Linux), so none is orphaned."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def worker_main(settings: Settings, model_name: str, tokens: dict[str, str], index: int, parent_pid: int,
                metrics_dir: str | None = None) -> None:
    """One serving process: its own app and clients, its own SO_REUSEPORT socket on the shared port."""
    _exit_with_parent(parent_pid)
    # the supervisor orders the shutdown (SIGTERM); uvicorn takes SIGINT over once it serves
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format=f"%(asctime)s %(levelname)-5s worker {index} %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("feast", "urllib3", "httpx", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    import uvicorn

    from freshet.serving.app import create_app
    from freshet.serving.transport import uvicorn_options

    app = create_app(settings, model_name=model_name, tokens=tokens, metrics_dir=metrics_dir)
    sock = reuseport_socket(settings.http_host, settings.http_port)
    uvicorn.Server(uvicorn.Config(app, **uvicorn_options(settings))).run(sockets=[sock])


class WorkerPool:
    """Runs `workers` serving processes on settings.http_host:http_port until stopped."""

    def __init__(self, settings: Settings, model_name: str, tokens: dict[str, str], workers: int):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.settings = settings
        self.model_name = model_name
        self.tokens = tokens
        self.workers = workers
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads and clients
        self._procs: list = []
        self._started: list[float] = []
        self._stopping = False  # set by the signal handler: a plain flag, as a lock there could deadlock
        # prometheus_client's multiprocess directory, created by run() and removed when it returns.
        # Passed to the workers, not exported as PROMETHEUS_MULTIPROC_DIR: Feast sets that variable
        # to its own directory on import, and it would switch every prometheus_client metric of the
        # worker to mmap'd values, on the request path.
        self.metrics_dir: str | None = None

    def _spawn(self, index: int):
        proc = self._ctx.Process(target=worker_main, name=f"freshet-serve-{index}", daemon=False,
                                 args=(self.settings, self.model_name, self.tokens, index, os.getpid(),
                                       self.metrics_dir))
        proc.start()
        log.info("worker %d started (pid %d)", index, proc.pid)
        return proc

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM; 0 after a clean stop, 1 if a worker failed to start."""
        # Holding a bound (never listening) socket reserves the port against other programs and
        # fails here, once, if it is taken
        reserved = reuseport_socket(self.settings.http_host, self.settings.http_port)
        self.metrics_dir = tempfile.mkdtemp(prefix="freshet-serve-metrics-")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            for i in range(self.workers):
                self._procs.append(self._spawn(i))
                self._started.append(time.monotonic())
            log.info("serving on http://%s:%d with %d workers", self.settings.http_host, self.settings.http_port,
                     self.workers)
            while not self._stopping:
                time.sleep(0.5)
                if not self._stopping and not self._replace_dead_workers():
                    code = 1
                    break
        finally:
            self._stop_all()
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def _replace_dead_workers(self) -> bool:
        for i, proc in enumerate(self._procs):
            if proc.is_alive():
                continue
            lived = time.monotonic() - self._started[i]
            if lived < STARTUP_GRACE_S:
                log.error("worker %d (pid %d) exited with code %s %.0fs after starting: stopping all workers",
                          i, proc.pid, proc.exitcode, lived)
                return False
            log.warning("worker %d (pid %d) died with code %s; starting a new one", i, proc.pid, proc.exitcode)
            _forget_worker(self.metrics_dir, proc.pid)
            self._procs[i] = self._spawn(i)
            self._started[i] = time.monotonic()
        return True

    def _stop_all(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)  # uvicorn drains requests and flushes the prediction log
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker pid %d did not stop within %.0fs: killing it", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.join()
        log.info("all %d workers stopped", len(self._procs))


def _forget_worker(metrics_dir: str, pid: int) -> None:
    """A dead worker's gauges leave /metrics; its counts stay in the sums."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, metrics_dir)


def run(settings: Settings, model_name: str | None = None, workers: int = 1) -> int:
    """Serve on settings.http_host:http_port until interrupted (what `freshet serve` calls).

    With workers > 1, that many processes share the port (WorkerPool); the tokens are
    resolved once here so they cannot race to generate different ones.
    """
    from freshet.serving.auth import resolve_credentials

    model_name = model_name or settings.model_name
    if workers > 1:
        return WorkerPool(settings, model_name, resolve_credentials(settings), workers).run()
    import uvicorn

    from freshet.serving.app import create_app
    from freshet.serving.transport import uvicorn_options

    uvicorn.run(create_app(settings, model_name=model_name), **uvicorn_options(settings))
    return 0
