"""Where Kafka and Redis are: from settings, else from the embedded stack of the data dir.

The embedded stack (`freshet.app.stack`) writes its endpoints to `stack.json` in the data
dir; every component reads them back here, so engines never depend on the stack itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from freshet.errors import CliError
from freshet.settings import Settings

STATE_FILE = "stack.json"
log = logging.getLogger("freshet")


@dataclass
class Endpoints:
    """A running embedded stack: its addresses, process ids and log folder."""

    kafka: str
    redis_url: str
    kafka_pid: int
    redis_pid: int
    log_dir: str
    # when each process started (clock ticks after boot, /proc/<pid>/stat): a pid the
    # kernel recycled for another process is not ours to signal
    kafka_started: int = 0
    redis_started: int = 0

    def running(self) -> bool:
        """Both recorded processes are still the ones the stack started."""
        return is_process(self.kafka_pid, self.kafka_started) and is_process(self.redis_pid, self.redis_started)

    @property
    def feast_redis(self) -> str:
        return feast_connection_string(self.redis_url)


def feast_connection_string(redis_url: str) -> str:
    """Translate redis://[:pw@]host:port/db into Feast's "host:port,password=..,db=.." form.

    >>> feast_connection_string("redis://:s3cret@10.0.0.5:6380/2")
    '10.0.0.5:6380,password=s3cret,db=2'
    >>> feast_connection_string("rediss://cache:6379/0")
    'cache:6379,ssl=true'
    """
    u = urlparse(redis_url)
    parts = [f"{u.hostname or 'localhost'}:{u.port or 6379}"]
    if u.password:
        parts.append(f"password={u.password}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    db = (u.path or "/").lstrip("/")
    if db and db != "0":
        parts.append(f"db={db}")
    return ",".join(parts)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first); OSError if gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return proc_stat(pid)[0] != "Z"
    return True


def start_ticks(pid: int) -> int:
    """When a process started, in clock ticks after boot (field 22 of /proc/<pid>/stat); OSError if gone."""
    return int(proc_stat(pid)[19])


def is_process(pid: int, started: int) -> bool:
    """True while `pid` is alive and is the process that started at `started` (see start_ticks).

    A record without a start time (0) cannot be checked and is never taken for a running process.
    """
    if not started or not alive(pid):
        return False
    try:
        return start_ticks(pid) == started
    except OSError:
        return False


def read_state(data_dir: str | os.PathLike) -> Endpoints | None:
    """The endpoints recorded in a data dir, alive or not; None when there are none."""
    path = Path(data_dir) / STATE_FILE
    try:
        return Endpoints(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running_stack(data_dir: str | os.PathLike) -> Endpoints | None:
    """The embedded stack running for a data dir, or None when none runs."""
    endpoints = read_state(Path(data_dir).resolve())
    if endpoints is not None and endpoints.running():
        return endpoints
    return None


def resolve_endpoints(settings: Settings, need_redis: bool = True) -> Settings:
    """Fill empty Kafka/Redis endpoints from a running embedded stack of this data dir.

    Raises CliError naming the settings to set when an endpoint is needed and none is known.
    """
    if settings.kafka_bootstrap_servers and (settings.redis_url or not need_redis):
        return settings
    running = running_stack(settings.data_path)
    if running is None:
        wanted = [("FRESHET_KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers)]
        if need_redis:
            wanted.append(("FRESHET_REDIS_URL", settings.redis_url))
        missing = [name for name, value in wanted if not value]
        raise CliError(
            f"{' and '.join(missing)} not set and no embedded stack runs for {settings.data_path}; "
            "run 'freshet stack start' (or 'freshet up') or set them to your Kafka/Redis"
        )
    return settings.with_endpoints(settings.kafka_bootstrap_servers or running.kafka,
                                   settings.redis_url or running.redis_url)


def redis_client(settings: Settings, asyncio: bool = False, **kwargs: Any) -> Any:
    """The Redis client every component uses: one Redis, or a Redis Cluster with
    FRESHET_REDIS_CLUSTER=on (redis-py's cluster client, seeded from FRESHET_REDIS_URL).

    `asyncio` picks redis.asyncio's client of the same kind; `kwargs` go to the client
    (socket_timeout, ...).
    """
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    if settings.redis_cluster == "on":
        if asyncio:
            from redis.asyncio.cluster import RedisCluster as AsyncCluster

            return AsyncCluster.from_url(url, **kwargs)
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url, **kwargs)
    if asyncio:
        import redis.asyncio

        return redis.asyncio.Redis.from_url(url, **kwargs)
    import redis

    return redis.Redis.from_url(url, **kwargs)


def check_redis_mode(settings: Settings, timeout: float = 5.0) -> None:
    """Refuse to start against a Redis of the other kind than FRESHET_REDIS_CLUSTER says.

    A cluster node taken for one Redis answers MOVED for most keys; one Redis taken for a
    cluster has no slots to route by. Unreachable is not refused here: the components wait
    for Redis as they do after an outage.
    """
    import redis

    node = redis.Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0",
                                socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        enabled = str(node.info("cluster").get("cluster_enabled", 0)) == "1"
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return
    except redis.ResponseError as exc:  # e.g. INFO disabled by ACL: nothing to compare
        log.warning("cannot tell whether Redis at %s is a cluster node (%s)", _where(settings.redis_url), exc)
        return
    finally:
        node.close()
    wanted = settings.redis_cluster == "on"
    if enabled and not wanted:
        raise CliError(f"Redis at {_where(settings.redis_url)} is a Redis Cluster node (cluster_enabled:1) but "
                       "FRESHET_REDIS_CLUSTER=off; set FRESHET_REDIS_CLUSTER=on")
    if wanted and not enabled:
        raise CliError(f"FRESHET_REDIS_CLUSTER=on but Redis at {_where(settings.redis_url)} is not a cluster node "
                       "(cluster_enabled:0); point FRESHET_REDIS_URL at a cluster node or set "
                       "FRESHET_REDIS_CLUSTER=off")


def _where(url: str) -> str:
    """host:port of a Redis URL, for messages (never its password)."""
    u = urlparse(url or "redis://127.0.0.1:6379")
    return f"{u.hostname or '127.0.0.1'}:{u.port or 6379}"
