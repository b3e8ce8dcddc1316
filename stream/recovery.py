"""Redis outages: writes that wait for Redis to answer, and rows written back when it returns empty.

A write that fails because Redis is down, restarting or not answering (SIGSTOP, a long
fork) is retried with capped backoff while the micro-batch, and with it the stream and
its commits, waits; the log says what is waited for and for how long. A Redis that
comes back without its data (restarted without persistence, failed over to an empty
replica, flushed), even while the worker was down, lacks the markers the worker keeps
beside its rows (RowMarkers): those partitions' live entities are written again from state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterator

import orjson

from freshet.stream import chunks
from freshet.stream.isolation import is_infrastructure

log = logging.getLogger("freshet.stream")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0  # a Redis back from an outage is written to within a second
WAITING_LOG_S = 5.0  # how often a continuing wait is logged again
HUNG_AFTER_S = 2.0  # a write unanswered this long is logged as waiting for a hung Redis
MARKER_TIMEOUT_S = 2.0
WRITE_BACK_ROWS = 5000  # rows per pipelined write while restoring


def where(client: Any) -> str:
    """host:port of a redis.asyncio client, for log lines (never its password)."""
    if hasattr(client, "nodes_manager"):  # Redis Cluster: the addresses it was given
        return "Redis Cluster " + ",".join(sorted(client.nodes_manager.startup_nodes))
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}" if "host" in kwargs else \
        str(kwargs.get("path", "redis"))


class PatientWriter:
    """Writes rows with `layout.write_async`, waiting out Redis outages instead of failing.

    Rows are whole Feast rows (HSET of every field), so a write retried after a failure
    that may have half-applied it leaves the same row. Failures an event's data causes
    (isolation.is_infrastructure false) are raised at once, for the engine to isolate.
    """

    def __init__(self, layout, client):
        self.layout = layout
        self.client = client
        self.outages = 0
        self.waited_s = 0.0

    async def write(self, view: str, rows: list) -> int:
        return await self.patiently(lambda: self.layout.write_async(self.client, view, rows),
                                    f"{len(rows)} rows of view {view}")

    async def patiently(self, command: Callable[[], Any], what: str) -> Any:
        """`await command()` until Redis answers it (a new coroutine per attempt)."""
        delay, since, logged = BACKOFF_FIRST_S, None, 0.0
        while True:
            try:
                written = await self._answered(command(), what)
            except Exception as exc:  # noqa: BLE001 - sorted by is_infrastructure
                if not is_infrastructure(exc):
                    raise
                now = time.monotonic()
                if since is None:
                    since = logged = now
                    self.outages += 1
                    log.warning("Redis at %s unavailable (%s: %s): holding %s, and the stream, "
                                "until it answers; retrying every %.2g-%.2g s", where(self.client),
                                type(exc).__name__, str(exc)[:200], what, BACKOFF_FIRST_S, BACKOFF_MAX_S)
                elif now - logged >= WAITING_LOG_S:
                    logged = now
                    log.warning("still waiting for Redis at %s after %.0f s (%s: %s)", where(self.client),
                                now - since, type(exc).__name__, str(exc)[:200])
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            if since is not None:
                waited = time.monotonic() - since
                self.waited_s += waited
                log.warning("Redis at %s answers again after %.1f s; the stream goes on", where(self.client), waited)
            return written

    async def _answered(self, write, what: str) -> Any:
        """The write's result; while Redis does not answer (a hung server), log that we wait."""
        task = asyncio.ensure_future(write)
        started, wait = time.monotonic(), HUNG_AFTER_S
        while True:
            done, _ = await asyncio.wait({task}, timeout=wait)
            wait = WAITING_LOG_S
            if done:
                return task.result()
            log.warning("Redis at %s has not answered a write of %s for %.0f s (hung?); "
                        "waiting for its reply", where(self.client), what, time.monotonic() - started)


class RowMarkers:
    """Notices a Redis that lost (or never had) the rows of the partitions this worker writes.

    Beside the rows, each (view, partition) whose entities a worker writes has a marker key
    in Redis. A marker missing means that Redis has not got that partition's rows: it was
    restarted without persistence, failed over to an empty replica or flushed, while the
    worker ran or while it was down (a run id compared in memory misses the latter). The
    partition's entities are then written back from state, and the marker set first, so a
    Redis lost again during the write-back is noticed at the next check.
    """

    def __init__(self, client, app_id: str):
        self.client = client
        self.prefix = f"freshet:{app_id}:rows:"
        self._check: tuple[list, asyncio.Future] | None = None  # (pairs, their EXISTS) in flight

    def key(self, view: str, partition: int) -> str:
        """
        >>> RowMarkers(None, "stream").key("card_txn_stats", 3)
        'freshet:stream:rows:card_txn_stats:3'
        """
        return f"{self.prefix}{view}:{partition}"

    async def keys(self, pairs: list[tuple[str, int]]) -> list[list[str]]:
        """The marker keys of each (view, partition): one, or on a Redis Cluster one per primary.

        A cluster primary can lose its data alone (flushed, failed over to an empty replica):
        one marker, living on one primary, would not notice the rows the others lost. So each
        primary holds its own copy, placed there by a hash tag (freshet.redis_cluster.hash_tags);
        after a resharding the tags are chosen again from the new slot map.
        """
        if not hasattr(self.client, "nodes_manager"):
            return [[self.key(view, partition)] for view, partition in pairs]
        tags = await self._tags()
        rest = self.prefix[len("freshet:"):]
        return [[f"freshet:{{{tag}}}:{rest}{view}:{partition}" for tag in tags] for view, partition in pairs]

    async def _tags(self) -> list[str]:
        from freshet.redis_cluster import hash_tags

        await self.client.initialize()
        slots = self.client.nodes_manager.slots_cache

        def owner(slot: int):
            nodes = slots.get(slot)
            return nodes[0].name if nodes else None

        primaries = {node.name for node in self.client.get_primaries()}
        return sorted(hash_tags(primaries, owner).values())

    async def missing(self, pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (view, partition) pairs without a marker; none while Redis does not answer
        (the writer waits for it, and the next check looks again).

        A check Redis has not answered in MARKER_TIMEOUT_S is left running, not cancelled
        (a command cancelled mid-reply costs the client its connection), and the next call
        takes its answer instead of waiting again: a hung Redis delays one commit, not each.
        """
        if not pairs:
            return []
        fresh = self._check is None
        if fresh:
            self._check = (pairs, asyncio.ensure_future(self._exists(pairs)))
        checked, task = self._check
        done, _ = await asyncio.wait({task}, timeout=MARKER_TIMEOUT_S if fresh else 0)
        if not done:
            return []
        self._check = None
        try:
            found = task.result()
        except Exception as exc:  # noqa: BLE001 - an outage: nothing to compare
            if not is_infrastructure(exc):
                raise
            return []
        wanted = set(pairs)  # partitions revoked since the check started are not ours to write
        return [pair for pair, n in zip(checked, found) if not n and pair in wanted]

    async def _exists(self, pairs: list[tuple[str, int]]) -> list[int]:
        """Per pair: 1 when every one of its marker keys exists, else 0."""
        keyed = await self.keys(pairs)
        pipe = self.client.pipeline(transaction=False)
        for keys in keyed:
            for key in keys:
                pipe.exists(key)
        found = iter(await pipe.execute())
        return [int(all([next(found) for _ in keys])) for keys in keyed]

    async def mark(self, pairs: list[tuple[str, int]], writer: "PatientWriter") -> None:
        """Set these markers, waiting out an outage as row writes do."""
        async def set_all():
            keyed = await self.keys(pairs)
            pipe = self.client.pipeline(transaction=False)
            for keys in keyed:
                for key in keys:
                    pipe.set(key, b"%.3f" % time.time())
            return await pipe.execute()

        await writer.patiently(set_all, f"{len(pairs)} row markers")


def is_entity_key(key: bytes) -> bool:
    """Table keys that hold an entity's state (not fences, marks or chunks).

    >>> is_entity_key(b"card1"), is_entity_key(b"\\x00freshet:recovery-fence"), is_entity_key(b"c\\x00chunk\\x00g\\x000")
    (True, False, False)
    """
    return not key.startswith(b"\x00") and b"\x00chunk\x00" not in key


def join_values(join_key_types: tuple[str, ...], key: bytes) -> tuple:
    """The join key values an entity key was made from (engine.entity_key), typed as the view's.

    >>> join_values(("STRING",), b"card1"), join_values(("INT64",), b"42"), join_values(("STRING", "INT64"), b'["a",1]')
    (('card1',), (42,), ('a', 1))
    """
    if len(join_key_types) == 1:
        text = key.decode()
        return (int(text),) if join_key_types[0] in ("INT64", "INT32") else (text,)
    return tuple(orjson.loads(key))


def current_rows(processor, owns: Callable[[bytes], bool]) -> Iterator[tuple[tuple, dict, float]]:
    """Every entity's current row of one view (ViewProcessor), for the entities `owns` accepts:
    the live states, and the checkpointed ones no longer kept in memory."""
    agg, data, live, view = processor.agg, processor.table.data, processor.live, processor.view
    now = processor.clock.now()
    keys = set(live)
    keys.update(k for k in list(data.keys()) if is_entity_key(k))
    for key in keys:
        if not owns(key):
            continue
        state = live.get(key)
        if state is None:
            stored = data.get(key)
            if stored is None:
                continue
            if chunks.is_header(stored):
                stored, _ = chunks.joined(data, key, stored)
            state = agg.decode(stored)
        if state["max_ts"] is None:
            continue
        agg.evict(state)
        as_of = processor.refresh.as_of(state, now)  # as every row is written: as of the stream's clock
        yield join_values(view.join_key_types, key), agg.result(state, as_of), as_of


async def write_back(processors: dict, owns_of: Callable[[str], Callable[[bytes], bool]],
                     writer: PatientWriter) -> int:
    """Write every owned live entity's current row of every online view; returns the rows.

    The processors' locks are held throughout, so no batch changes a state meanwhile."""
    started = time.monotonic()
    for processor in processors.values():
        await processor.lock.acquire()
    n = 0
    try:
        for name, processor in processors.items():
            if not processor.view.online:
                continue
            rows = list(current_rows(processor, owns_of(name)))
            for start in range(0, len(rows), WRITE_BACK_ROWS):
                n += await writer.write(name, rows[start:start + WRITE_BACK_ROWS])
    finally:
        for processor in processors.values():
            processor.lock.release()
    log.warning("wrote %d live entities' rows back to Redis in %.2f s", n, time.monotonic() - started)
    return n
