"""Building a view's new version from the offline raw log (freshet.feature_versions).

A version after v0 starts with no state. Before a worker applies any event to such a version
in a partition it has just taken, it builds that partition's entity states from the raw log:
every event the consumer group has committed on the view's source topic, in event-time order,
with each entity's state recording the last offset applied per source partition as the live
path does. Events after the cut reach the version through the stream as usual; one before it
that comes again (a replay, a repartition message still in flight) is skipped as already
applied. So the built version holds exactly what it would hold had it run from the start.

Committed events are in the raw log: a worker commits a source offset only after the raw log
parts before it are written. A partition's build is recorded in its changelog (a record the
table recovers with the states), so a successor does not build it again, and in a Redis set of
built partitions; when every partition of a pending version is built, the worker that built the
last one promotes it (a Feast pin), and servers switch to it at their next registry refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from freshet.features import ViewSpec
from freshet.feature_versions import PENDING, built_key
from freshet.stream.aggregations import ViewAggregator
from freshet.stream.recovery import current_rows

log = logging.getLogger("freshet.stream.versions")

BUILT_PREFIX = b"\x00freshet:built:"  # never an entity key (recovery.is_entity_key)
WRITE_ROWS = 5000


def built_record(partition: int) -> bytes:
    """The table key recording that a partition of a version was built from the raw log.

    >>> built_record(3)
    b'\\x00freshet:built:3'
    """
    return BUILT_PREFIX + b"%d" % partition


def replay_partitions(settings, view: ViewSpec, committed: Callable[[list[int]], dict[int, int]],
                      owner: Callable[[bytes], int], partitions: set[int], entity_key) -> tuple[dict, int]:
    """Entity states of `view` for the entities owned by `partitions`, from the raw log's events
    before the group's committed offsets (`committed(source partitions)`); returns (states, events).
    CPU-bound: run it in a thread."""
    from freshet.stream.backfill import _ordered, _records, load_events

    df = load_events(settings, view.topic)
    if df.empty:
        return {}, 0
    cut = committed(sorted({*df["_partition"].unique().tolist()}))
    df = df[df["_offset"].to_numpy() < df["_partition"].map(cut).fillna(0).to_numpy()]
    if df.empty:
        return {}, 0
    ts, df = _ordered(df, view)
    agg = ViewAggregator(view)
    columns = sorted({*view.join_keys, *(a.column for a in view.aggregations)})
    sources = [f"{view.topic}:{p}" for p in df["_partition"].tolist()]
    states: dict[bytes, dict] = {}
    n = 0
    for t, row, source, offset in zip(ts, _records(df, columns), sources, df["_offset"].tolist()):
        key = entity_key(view, row)
        if owner(key) not in partitions:
            continue
        state = states.get(key)
        if state is None:
            state = states[key] = agg.new_state()
        agg.update(state, float(t), row)
        if state["offsets"].get(source, -1) < offset:
            state["offsets"][source] = offset
        n += 1
    for state in states.values():
        agg.evict(state)
    return states, n


class VersionBuilds:
    """Builds the versions after v0 a worker computes, partition by partition, as it takes them."""

    def __init__(self, engine: Any, entity_key: Callable):
        self.engine = engine
        self.entity_key = entity_key  # engine.entity_key: how the stream keys an entity's state
        self.pending_built: list[tuple[str, int]] = []  # (view's stored name, partition): for the next checkpoint

    def needed(self) -> dict[str, list[int]]:
        """Stored name -> owned partitions whose build is not recorded in the table."""
        out = {}
        for stored, (_, number, _) in self.engine.registry.versions.items():
            if number == 0:
                continue
            data = self.engine.processors[stored].table.data
            todo = [p for p in sorted(self.engine._owned_partitions(stored)) if built_record(p) not in data]
            if todo:
                out[stored] = todo
        return out

    async def run(self) -> None:
        """Build what is needed (before the stream resumes), record it, promote what is complete."""
        engine = self.engine
        for stored, partitions in self.needed().items():
            await self._build(stored, partitions)
        if self.pending_built:
            await engine.checkpoint()
            await engine.app.producer.flush()
        for stored, (view, number, state) in engine.registry.versions.items():
            if number == 0:
                continue
            owned = sorted(engine._owned_partitions(stored))
            key = built_key(engine.app.conf.id, stored)
            if owned:
                await engine.redis.sadd(key, *owned)
            built = await engine.redis.scard(key)
            if state == PENDING and built >= engine.partitions:
                await asyncio.to_thread(self._promote, view, number, stored)
                engine.registry.versions[stored] = (view, number, "active")

    async def _build(self, stored: str, partitions: list[int]) -> None:
        from freshet.kafka import committed_offsets

        engine = self.engine
        processor = engine.processors[stored]
        view = processor.view
        t0 = time.monotonic()
        log.info("version %s: building partitions %s from the raw log", stored, partitions)

        def committed(source_partitions: list[int]) -> dict[int, int]:
            wanted = sorted({*source_partitions, *range(engine.partitions)})
            return committed_offsets(engine.settings, engine.app.conf.id, view.topic, wanted)

        states, events = await asyncio.to_thread(replay_partitions, engine.settings, view, committed,
                                                 engine._owner_partition, set(partitions), self.entity_key)
        async with processor.lock:
            if states:
                processor.clock.observe(max(s["max_ts"] for s in states.values()))
            for key, state in states.items():
                processor.live[key] = state
                processor.dirty.add(key)
            rows = list(current_rows(processor, states.__contains__)) if view.online else []
            for start in range(0, len(rows), WRITE_ROWS):
                await processor.sink.online.write(view.name, rows[start:start + WRITE_ROWS])
            processor.refresh.recovered(list(states))
        self.pending_built += [(stored, p) for p in partitions]
        log.info("version %s: built %d entities of partitions %s from %d events of the raw log in %.1f s",
                 stored, len(states), partitions, events, time.monotonic() - t0)

    def checkpoint_records(self, by_partition: dict) -> None:
        """The build records join the checkpoint (under the processors' locks), each in its
        partition of the version's changelog, after the states it covers."""
        for stored, partition in self.pending_built:
            table = self.engine.processors[stored].table
            key = built_record(partition)
            table.data[key] = b"1"
            table.data._key_partition[key] = partition
            by_partition.setdefault((table.changelog_topic.get_topic_name(), partition), []).append((key, b"1"))
        self.pending_built.clear()

    def _promote(self, view: str, number: int, stored: str) -> None:
        from freshet.features import feature_store
        from freshet.feature_versions import promote

        if promote(feature_store(self.engine.settings), view, number):
            log.warning("feature view %s: version %d is built in every partition and now active (%s); servers "
                        "switch at their next registry refresh", view, number, stored)
