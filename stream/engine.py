"""The stream engine: Faust agents computing Feast stream feature views.

Per source topic an agent decodes and validates micro-batches (bad events to the
dead-letter topic), appends accepted events to the offline raw log, and updates
per-entity tiles in changelog-backed Faust tables; changed entities are written to
Redis in Feast's layout and to the offline feature log.

Delivery is at-least-once with exactly-once effects: each entity's state records
the last source offset applied per partition, so a replay after a crash is skipped,
and offsets are committed only after the offline parts, table changelog and
repartition messages they cover are durable.

Each entity has exactly one writer. A view keyed by the field producers key
messages by (the KafkaSource tag `freshet.message_key`) is computed in the source
partition when the event is in its key's murmur2 partition, as Java's partitioner puts
it; an event elsewhere (another partitioner, e.g. librdkafka's default CRC32) and any
event of another view (merchant views on a topic keyed by card) first travels through
an internal repartition topic to the partition owning its entity.

Bad input never stops the stream: events are validated (events.py) before they touch
state, and an event that makes a later stage fail is found by splitting its batch and
dead-lettered with the exception (isolation.py); only failures of Kafka or Redis stop
a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any, Callable


import aiokafka
import faust
import faust.transport.drivers.aiokafka as faust_aiokafka
import orjson
import pyarrow as pa
from aiokafka.partitioner import murmur2

from freshet.contracts import DeadLetter
from freshet.endpoints import redis_client
from freshet.features import FeatureRegistry, ViewSpec
from freshet.kafka import topic_config
from freshet.settings import Settings
from freshet.stream import chunks
from freshet.stream.aggregations import ViewAggregator
from freshet.stream.crashpoints import stream_crash_points
from freshet.stream.events import EventDecoder, EventError
from freshet.stream.expiry import TICK_S, IdleRefresh, StreamClock
from freshet.stream.isolation import describe, is_infrastructure, split_failures
from freshet.offline_store import OfflineStore
from freshet.stream.offline import PartBuffer
from freshet.stream.recovery import PatientWriter, RowMarkers, is_entity_key, where, write_back
from freshet.stream.snapshots import Snapshot, TableSnapshots, load_partition, table_image
from freshet.stream.versions import VersionBuilds
from freshet.stream.watermarks import WatermarkMarks, record_key

log = logging.getLogger("freshet.stream")

# Each entity a micro-batch changes costs one result and one Redis and offline row, however
# many of its events the batch holds: a larger batch shares them among more events (20,000
# events over bench/stream.py's 20,000 cards change ~12,600 of them, 5,000 change ~4,400:
# 19,600 -> 22,000 events/s). The cap bounds how long a backlog keeps results from Redis.
BATCH_MAX = 20000
BATCH_WITHIN_S = 0.05
PRODUCER_BATCH_BYTES = 512 * 1024
STATS_INTERVAL_S = 10.0
STUCK_LOG_S = 10.0  # a partition's processed offsets not committable this long is logged
SOURCE_FIELDS = ("_partition", "_offset")
FENCE_KEY = b"\x00freshet:recovery-fence"  # never an entity key: those are UTF-8 text or JSON
# The broker refuses messages over ~1 MB: internal messages are cut well below it, and a
# dead letter carries at most this much of the original payload (base64 adds a third).
INTERNAL_MESSAGE_BYTES = 256 * 1024
DEADLETTER_PAYLOAD_BYTES = 512 * 1024
# Live states kept in memory past a checkpoint; beyond this many, the ones that were not
# changed since are dropped (their encoded form stays in the table) so memory follows the
# entities in use, not every entity ever seen.
LIVE_MAX = 100_000  # ~2.7 KB each for a card of the example


LAG_INTERVAL_S = 1.0
STARTED = time.monotonic()  # the worker process's start, near enough (this module's import)


def _patch_clients(fetch_wait_ms: int, idempotent: bool) -> None:
    """Faust passes a hard-coded fetch_max_wait_ms=1500 to aiokafka; that alone costs
    seconds of freshness (docs/architecture.md), so its consumer class gets ours. Faust asks
    for an idempotent producer only inside transactions; `idempotent` asks for one always
    (where the broker grants it: stream/idempotence.py)."""

    class FastFetchConsumer(aiokafka.AIOKafkaConsumer):
        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = fetch_wait_ms
            super().__init__(*args, **kwargs)

    class IdempotentProducer(aiokafka.AIOKafkaProducer):
        def __init__(self, *args, **kwargs):
            kwargs["enable_idempotence"] = True
            super().__init__(*args, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(aiokafka, k) for k in dir(aiokafka) if not k.startswith("__")})
    shim.AIOKafkaConsumer = FastFetchConsumer
    if idempotent:
        shim.AIOKafkaProducer = IdempotentProducer
    faust_aiokafka.aiokafka = shim


def entity_key(view: ViewSpec, row: dict[str, Any]) -> bytes:
    """Table and repartition key: the join key value, or a JSON list for composite keys."""
    if len(view.join_keys) == 1:
        return str(row[view.join_keys[0]]).encode()
    return orjson.dumps([row[k] for k in view.join_keys])


def entity_keys(view: ViewSpec) -> Callable[[dict[str, Any]], bytes]:
    """`entity_key` for one view, its join keys looked up once (it runs per event)."""
    if len(view.join_keys) == 1:
        k = view.join_keys[0]
        return lambda row: str(row[k]).encode()
    return lambda row: entity_key(view, row)


UTC_MICROS = pa.timestamp("us", tz="UTC")


def _timestamps(seconds: list) -> pa.Array:
    """Epoch seconds (None allowed) as a UTC timestamp column, without a datetime per value."""
    micros = pa.array([None if s is None else round(s * 1e6) for s in seconds], pa.int64())
    return micros.cast(UTC_MICROS)


def _raw_table(decoder: EventDecoder, accepted, ingested_at: float | None = None) -> pa.Table:
    """The raw-log rows of accepted (partition, offset, event time, row) events.

    `_ingested_at` (epoch s, the batch's wall clock) says when the stream accepted each event,
    so an offline recomputation can take only what the stream had seen by a request's time."""
    rows = [event[3] for event in accepted]
    columns = {name: [row.get(name) for row in rows] for name in decoder.schema}  # one pass per column
    parts = [event[0] for event in accepted]
    offsets = [event[1] for event in accepted]
    arrays = {}
    for name, values in columns.items():
        kind = decoder.schema[name]
        if name == decoder.timestamp_field or kind == "timestamp":
            arrays[name] = _timestamps([v if isinstance(v, (int, float)) else None for v in values])
        else:
            arrays[name] = pa.array(values, {"string": pa.string(), "int": pa.int64(),
                                             "float": pa.float64(), "bool": pa.bool_()}[kind])
    arrays["_partition"] = pa.array(parts, pa.int32())
    arrays["_offset"] = pa.array(offsets, pa.int64())
    if ingested_at is not None:
        arrays["_ingested_at"] = pa.array([ingested_at] * len(offsets), pa.float64())
    return pa.table(arrays)


def feature_table(view: ViewSpec, segments: list[tuple[list, float]]) -> pa.Table:
    """The offline feature rows of micro-batches [(rows, created), ...]: join keys, every
    feature, the event time and `created` (when its batch was written online)."""
    rows = [row for part, _ in segments for row in part]
    # transposed in C: every row's values are ViewAggregator.result's, in one order
    keys, values = zip(*[r[0] for r in rows]), zip(*[r[1].values() for r in rows])
    columns = {k: pa.array(col) for k, col in zip(view.join_keys, keys)}
    columns.update((name, pa.array(col)) for name, col in zip(rows[0][1], values))
    columns[view.timestamp_field] = _timestamps([r[2] for r in rows])
    columns["created"] = _timestamps([created for part, created in segments for _ in part])
    return pa.table(columns)


def _bounded(blob: bytes, items: list) -> list[bytes]:
    """A JSON list over INTERNAL_MESSAGE_BYTES as several smaller ones (halving the items)."""
    if len(blob) <= INTERNAL_MESSAGE_BYTES or len(items) == 1:
        return [blob]
    mid = len(items) // 2
    return [chunk for half in (items[:mid], items[mid:]) for chunk in _bounded(orjson.dumps(half), half)]


@dataclass
class Counters:
    accepted: int = 0
    deadlettered: int = 0
    duplicates_skipped: int = 0
    repartitioned: int = 0
    rerouted: int = 0  # events of a message-keyed view that arrived outside their key's partition
    redelivered: int = 0  # messages the fetcher handed over twice (dropped: ReadPositions)
    stale_fetches: int = 0  # fetches of a partition that raced a seek (fetched again: ReadPositions)
    unprocessable: int = 0  # events that made a later stage fail (dead-lettered)
    rows_online: int = 0
    rows_offline: int = 0
    rows_expired: int = 0  # online rows written again because a tile left a window
    changelog_records: int = 0
    snapshots_written: int = 0  # table partitions written to snapshot files
    snapshots_restored: int = 0  # changelog partitions recovered from a snapshot (then their tail)
    snapshot_failures: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per phase

    def timed(self, phase: str, started: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


Item = tuple  # (entity key, event time, row, source "topic:partition", source offset)


class ViewProcessor:
    """Applies events to one view's entity states and emits the changed feature rows.

    Live states stay in memory; the changelog gets each changed entity once per
    offset commit (`checkpoint`), not once per micro-batch, so a busy entity costs
    one compact record per second instead of one full-state record per batch.

    The batches applied since the last checkpoint are kept, so when a batch fails, the
    states it touched can be rebuilt as they were before it (checkpointed state + those
    batches) and the batch retried in parts to find the events that cause the failure.
    """

    def __init__(self, view: ViewSpec, table, sink: "FeatureSink", clock: StreamClock | None = None):
        self.view = view
        self.agg = ViewAggregator(view)
        self.table = table
        self.sink = sink
        # rows are evaluated as of the stream's clock and written again when a tile leaves a window
        self.clock = clock or StreamClock()
        self.refresh = IdleRefresh(self, self.clock)
        self.live: dict[bytes, dict] = {}
        self.dirty: set[bytes] = set()
        self.applied: list[list[Item]] = []  # batches applied since the last checkpoint
        self.chunked: dict[bytes, tuple[str, int]] = {}  # key -> its chunked changelog record's header
        # held while a batch is applied and written: a checkpoint never sees half a batch,
        # so a failed batch can be rebuilt from the checkpoint and `applied`
        self.lock = asyncio.Lock()
        self.disowned = 0  # changed entities not written: their partition had moved away
        # an event's join key values, as a tuple (itemgetter gives a bare value for one key)
        keys = view.join_keys
        self._join_values = (lambda row, k=keys[0]: (row[k],)) if len(keys) == 1 else itemgetter(*keys)

    def forget(self) -> None:
        """Drop working states; after a rebalance the table (changelog) is the truth.

        Dirty states are dropped too: the offsets they cover were not committed, so
        whoever owns their partition next replays those events.
        """
        self.live.clear()
        self.dirty.clear()
        self.applied.clear()

    def stored_entities(self, owns: Callable[[bytes], bool]) -> list[bytes]:
        """Entities read back from the changelog that this worker writes and holds no live
        state of (never the fence, a chunk, or a partition's checkpointed watermark marks)."""
        return [key for key in list(self.table.data) if is_entity_key(key) and owns(key) and key not in self.live]

    def _state(self, key: bytes) -> dict:
        state = self.live.get(key)
        if state is None:
            data = self.table.data
            stored = data.get(key)
            if chunks.is_header(stored):  # recovered from a chunked changelog record
                stored, self.chunked[key] = chunks.joined(data, key, stored)
            state = self.agg.new_state() if stored is None else self.agg.decode(stored)
            self.live[key] = state
        return state

    def checkpoint(self, owner: Callable[[bytes], int], owned: set[int],
                   index: dict | None = None) -> dict[int, list[tuple[bytes, bytes | None]]]:
        """Encode every entity changed since the last checkpoint: its changelog records
        (record key, value) grouped by the partition `owner(key)` gives, each key's records
        in order (a large state is several: chunks.py); `index` (the table's key ->
        partition map) learns each key's partition.

        Synchronous, so the records hold every event applied so far and nothing half
        applied (the caller holds `lock`). Entities of partitions no longer owned (not in
        `owned`) are not written: a late write would land after the new owner's recovery.
        """
        out: dict[int, list[tuple[bytes, bytes | None]]] = {}
        data, live, chunked, encode = self.table.data, self.live, self.chunked, self.agg.encode
        limit = chunks.CHUNK_BYTES
        for key in self.dirty:
            partition = owner(key)
            if partition not in owned:
                live.pop(key, None)
                self.disowned += 1
                continue
            value = encode(live[key])
            data[key] = value
            if index is not None:
                index[key] = partition
            records = out.get(partition)
            if records is None:
                records = out[partition] = []
            if len(value) <= limit and key not in chunked:
                records.append((key, value))
                continue
            for chunk_key, record in chunks.records(key, value, chunked.pop(key, None)):
                records.append((chunk_key, record))
                if chunk_key == key and chunks.is_header(record):
                    chunked[key] = chunks.header_of(record)
        self.dirty.clear()
        self.applied.clear()
        if len(live) > LIVE_MAX:  # oldest first: dicts keep insertion order
            for key in list(live)[:len(live) - LIVE_MAX]:
                del live[key]
        return out

    async def apply(self, items: list[Item], counters: Counters) -> list[tuple[Item, str]]:
        """Apply (key, event time, row, source "topic:partition", source offset) in order.

        Returns the events that made the view fail, with the reason, applied to nothing."""
        async with self.lock:
            try:
                await self._apply(items, counters)
            except Exception as exc:  # noqa: BLE001 - is_infrastructure sorts it
                if is_infrastructure(exc):
                    raise
                log.warning("view %s: a batch of %d events failed (%s: %s); finding the events that cause it",
                            self.view.name, len(items), type(exc).__name__, exc)
                return await self._isolate(items, counters)
            self.applied.append(items)
            return []

    async def _apply(self, items: list[Item], counters: Counters) -> None:
        t0 = time.perf_counter()
        changed: dict[bytes, tuple[dict, dict]] = {}
        live, load, update = self.live, self._state, self.agg.update  # looked up once per batch
        for key, ts, row, source, offset in items:
            state = live.get(key)
            if state is None:
                state = load(key)
            offsets = state["offsets"]
            if offsets.get(source, -1) >= offset:
                counters.duplicates_skipped += 1
                continue
            update(state, ts, row)
            offsets[source] = offset
            changed[key] = (state, row)
        counters.timed("aggregate", t0)
        if not changed:
            return
        t0 = time.perf_counter()
        self.clock.observe(max(state["max_ts"] for state, _ in changed.values()))
        now = self.clock.now()
        rows = []
        evict, result, join_values = self.agg.evict, self.agg.result, self._join_values
        for state, row in changed.values():
            evict(state)
            latest = state["max_ts"]  # IdleRefresh.as_of, inlined
            as_of = latest if now is None or (latest is not None and latest > now) else now
            rows.append((join_values(row), result(state, as_of), as_of))
        counters.timed("result", t0)
        t0 = time.perf_counter()
        await self.sink.write(self.view, rows, counters)
        if self.sink.metrics is not None and self.view.online:
            self.sink.metrics.observe_written(self.view.name, (item[1] for item in items))
        # checkpointed only now that its rows are in Redis and queued for the offline store
        # (the lock keeps a checkpoint out meanwhile; this order says so without it)
        self.dirty.update(changed)
        self.refresh.written(changed, (state for state, _ in changed.values()), now)
        counters.timed("sink", t0)

    async def _isolate(self, items: list[Item], counters: Counters) -> list[tuple[Item, str]]:
        """Retry a failed batch entity group by entity group, halving the failing groups, and
        a failing entity's events one by one; returns the events that fail on their own."""
        groups: dict[bytes, list[Item]] = {}
        for item in items:
            groups.setdefault(item[0], []).append(item)
        self._rebuild(groups)
        good: list[Item] = []
        poison: list[tuple[Item, str]] = []
        await self._split(list(groups.items()), good, poison, counters, tried=True)
        self.applied.append(good)
        counters.unprocessable += len(poison)
        log.warning("view %s: %d of %d events could not be applied and go to the dead-letter topic: %s",
                    self.view.name, len(poison), len(items), "; ".join(sorted({reason for _, reason in poison}))[:500])
        return poison

    async def _split(self, groups: list, good: list, poison: list, counters: Counters, tried: bool = False) -> None:
        if not tried:
            batch = [item for _, its in groups for item in its]
            try:
                await self._apply(batch, counters)
                good.extend(batch)
                return
            except Exception as exc:  # noqa: BLE001
                if is_infrastructure(exc):
                    raise
                self._rebuild(key for key, _ in groups)
        if len(groups) > 1:
            mid = len(groups) // 2
            await self._split(groups[:mid], good, poison, counters)
            await self._split(groups[mid:], good, poison, counters)
            return
        key, its = groups[0]
        failed = len(poison)
        for item in its:  # one entity: each event on the state as it was before it
            before = self.agg.encode(self._state(key))
            try:
                await self._apply([item], counters)
                good.append(item)
            except Exception as exc:  # noqa: BLE001
                if is_infrastructure(exc):
                    raise
                self.live[key] = self.agg.decode(before)
                poison.append((item, describe(exc, f"view {self.view.name}")))
        if len(poison) > failed and self.live[key]["max_ts"] is not None:
            # a failed write may have reached Redis before failing: write the state without it
            state = self.live[key]
            row = next(item[2] for item in its)
            as_of = self.refresh.as_of(state, self.clock.now())
            try:
                await self.sink.write(self.view, [(tuple(row[k] for k in self.view.join_keys),
                                                   self.agg.result(state, as_of), as_of)], counters)
            except Exception as exc:  # noqa: BLE001
                if is_infrastructure(exc):
                    raise

    def _rebuild(self, keys) -> None:
        """These entities' states as before the current batch: checkpoint + batches applied since."""
        keys = set(keys)
        for key in keys:
            self.live.pop(key, None)
        for batch in self.applied:
            for key, ts, row, source, offset in batch:
                if key in keys:
                    state = self._state(key)
                    if state["offsets"].get(source, -1) < offset:
                        self.agg.update(state, ts, row)
                        state["offsets"][source] = offset
        for key in keys:
            self.agg.evict(self._state(key))


class HeldMessages:
    """Messages fetched while the consumer's flow is stopped (recovery, rebalance).

    Faust's own fetch loop drops such a message yet records it as read, so unless a
    seek follows it is never processed (the event a worker sometimes lost at start-up).
    They are held instead, untracked so a rebalance's wait for in-flight work does not
    wait for them, and released when the flow resumes, each at most once, unless the
    fetcher will deliver it again or its partition is no longer ours.

    "Delivered again" is read from the fetcher's own position, not from Faust's record of
    the last read offset: Faust resets that record for every partition when it seeks to
    the committed offsets, but the client seeks only where an offset above 0 is
    committed. Held messages of a partition with no commit yet (two workers of a new
    group, say) were dropped as if sought and then never fetched again: lost, and the
    group's committed offset stuck behind them for good.
    """

    def __init__(self, consumer, owned: Callable[[Any], bool], position: Callable[[Any], int | None]):
        self.consumer = consumer
        self.owned = owned
        self.position = position  # the offset the fetcher delivers next for a partition (None: unknown)
        self.batches: dict[str, list] = {}

    def hold(self, batches: dict[str, list]) -> None:
        for topic, messages in batches.items():
            self.consumer._unacked_messages.difference_update(messages)
            self.batches.setdefault(topic, []).extend(messages)

    def release(self) -> dict[str, list]:
        held, self.batches = self.batches, {}
        positions: dict[Any, int | None] = {}
        for topic, messages in held.items():
            kept, seen = [], set()
            for m in messages:
                if m.tp not in positions:
                    positions[m.tp] = self.position(m.tp)
                position = positions[m.tp]
                if (m.tp, m.offset) in seen or not self.owned(m) or position is None or m.offset >= position:
                    continue  # a copy, not ours, or the fetcher delivers it again
                seen.add((m.tp, m.offset))
                self.consumer.track_message(m)
                kept.append(m)
            held[topic] = kept
        return held


class ReadPositions:
    """Which fetched messages are new: the next offset expected per partition, set by seeks.

    Faust keeps one read offset per partition, meaning the offset last read except right
    after a seek, when it is the offset to read next; and the consumer's fetches run in
    another thread, so a fetch taken before a seek can be handed over after it. With that
    one number a fetch loop cannot tell a record fetched before a seek back (Faust's
    recovery seeks every partition to its committed offset after it started fetching) from
    new data past a gap: it took such a record as a gap, marked the offsets up to it as
    done although they were fetched again (a partition's commits then advanced one offset
    per commit: the "stalled" partition), skipped the refetched ones (lost) and processed a
    re-delivered last record twice (a truly late event counted).

    So each seek records the offset it set and bumps the partition's epoch. A message is:
    "stale" when its partition was sought while its fetch was under way (the caller seeks
    there again, so nothing of that fetch is trusted); "old" below the expected offset, or
    read already since the partition was assigned (Faust's recovery seeks back over what was
    fetched once the tables were recovered: read again, it would be dead-lettered and logged
    twice); "new" at it; "gap" past it (transaction markers, compaction: the offsets between
    are not data). Partitions never sought keep Faust's rule on its read offset.
    """

    def __init__(self, consumer):
        self.expected: dict = {}  # tp -> the next offset to read
        self.high: dict = {}  # tp -> the highest offset read since it was assigned
        self.epochs: dict = {}  # tp -> seeks so far
        seek, seek_to_committed = consumer.seek, consumer.seek_to_committed

        async def sought(partition, offset: int) -> None:
            await seek(partition, offset)
            self.moved(partition, offset)

        async def sought_committed():
            offsets = await seek_to_committed()
            for tp, offset in offsets.items():
                if offset is not None and offset >= 0:
                    self.moved(tp, offset)
            return offsets

        consumer.seek, consumer.seek_to_committed = sought, sought_committed
        self._seek = sought

    def moved(self, tp, offset: int) -> None:
        self.expected[tp] = offset
        self.epochs[tp] = self.epochs.get(tp, 0) + 1

    def snapshot(self) -> dict:
        """The epochs before a fetch: `admit` compares with them."""
        return dict(self.epochs)

    def admit(self, tp, offset: int, last: int | None, before: dict) -> str:
        """"new", "gap", "old" or "stale" (see the class); `last` is Faust's read offset."""
        if self.epochs.get(tp, 0) != before.get(tp, 0):
            return "stale"
        expected = self.expected.get(tp)
        if expected is None:  # never sought: Faust's read offset is the offset last read
            if last is not None and offset <= last:
                return "old"
            return "gap" if last is not None and offset - last > 1 else "new"
        if offset < expected:
            return "old"
        if offset <= self.high.get(tp, -1):  # read before a seek back: its effects and acks stand
            self.expected[tp] = offset + 1
            return "old"
        return "new" if offset == expected else "gap"

    def gap_from(self, tp, last: int | None) -> int:
        """The first offset of the gap before the message `admit` called "gap"."""
        expected = self.expected.get(tp)
        start = expected if expected is not None else last + 1
        return max(start, self.high.get(tp, -1) + 1)  # what was read is acknowledged already

    def read(self, tp, offset: int) -> None:
        if tp in self.expected:
            self.expected[tp] = offset + 1
        if offset > self.high.get(tp, -1):
            self.high[tp] = offset

    def unread(self, tp, offset: int) -> None:
        """Messages from `offset` on were read but dropped unprocessed (held, and the fetcher
        delivers them again): read them when they come again."""
        if self.high.get(tp, -1) >= offset:
            self.high[tp] = offset - 1
        if self.expected.get(tp, -1) > offset:
            self.expected[tp] = offset

    async def seek_again(self, tp) -> None:
        """Seek a partition whose fetch raced a seek to where that seek went."""
        await self._seek(tp, self.expected[tp])

    def forget(self, tps) -> None:
        """Partitions revoked: whoever reads them next starts from the committed offsets."""
        for tp in tps:
            self.expected.pop(tp, None)
            self.high.pop(tp, None)


def first_acked(consumer) -> dict:
    """The lowest acknowledged offset of each partition, before a commit takes a run of them."""
    return {tp: min(acked) for tp, acked in consumer._acked.items() if acked}


def give_back_acks(consumer, first: dict, offsets: dict) -> None:
    """Put back the acknowledgements a commit took but did not commit.

    Faust's `_filter_committable_offsets` removes the run of acknowledged offsets it turns
    into a committable offset. A commit that fails or is cancelled before Faust records the
    offset (an exception in the checkpoint or the flush, a cancellation while the worker
    stops or rebalances) would lose that run: the partition's acknowledgements then start
    past a hole nothing fills again (its messages were read), and its committed offset never
    moves again. Partitions whose offset Faust recorded as committed are left alone (even
    when the broker refused it, Faust moves on past it), and so are partitions revoked
    meanwhile: their next owner starts from the committed offset.
    """
    assignment = consumer.assignment()
    for tp, end in offsets.items():
        start, committed = first.get(tp), consumer._committed_offset.get(tp)
        if start is None or start >= end or tp not in assignment or (committed is not None and committed >= end):
            continue
        taken = range(start, end)
        acked, index = consumer._acked[tp], consumer._acked_index[tp]
        acked.extend(offset for offset in taken if offset not in index)
        acked.sort()
        index.update(taken)


def fetch_position(consumer, tp) -> int | None:
    """The offset Faust's Kafka client delivers next for `tp`, None when it has none."""
    client = consumer._thread._ensure_consumer()
    state = client._subscription.subscription.assignment.state_value(tp) \
        if client._subscription.subscription and client._subscription.subscription.assignment else None
    return state.position if state is not None and state.has_valid_position else None


class FeatureSink:
    """Writes feature rows online (Redis, Feast layout) and offline (Parquet parts)."""

    def __init__(self, settings: Settings, registry: FeatureRegistry, redis_client):
        from freshet.redis_layout import OnlineLayout

        self.layout = OnlineLayout(registry.project, registry.views)
        self.redis = redis_client
        self.online = PatientWriter(self.layout, redis_client)  # waits out Redis outages
        self.offline = PartBuffer()
        # each view's feature log, as its Feast batch source names it, in the settings' offline store
        store = OfflineStore.of(settings)
        self.offline_roots = {name: store.locate(v.offline_path) for name, v in registry.views.items()
                              if v.offline_path}
        # how each view's queued offline rows become a table when its parts are written
        self.offline_tables = {name: partial(feature_table, v) for name, v in registry.views.items() if v.offline_path}
        self.crash = stream_crash_points("")
        self.metrics: Any = None  # a StreamMetrics when the worker exports metrics

    async def write(self, view: ViewSpec, rows: list[tuple[tuple, dict, float]], counters: Counters) -> None:
        if view.online:
            await self.online.write(view.name, rows)
            counters.rows_online += len(rows)
            self.crash.reached("redis-written")
        if view.offline_path:
            # made into an Arrow table when the parts are written, with every batch's rows since
            self.offline.add_rows(self.offline_roots[view.name], rows, time.time(), view.timestamp_field,
                                  self.offline_tables[view.name])
            counters.rows_offline += len(rows)


class StreamEngine:
    """Builds the Faust app for every stream feature view in the registry."""

    def __init__(self, settings: Settings, registry: FeatureRegistry, app_id: str = "freshet-stream",
                 partitions: int | None = None, bulk_delivery: bool = True, idempotent: bool = False,
                 metrics: Any = None):
        _patch_clients(settings.kafka_fetch_max_wait_ms, idempotent)
        (settings.data_path / "faust").mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.registry = registry
        self.partitions = partitions or settings.kafka_partitions
        self.counters = Counters()
        self.app = faust.App(
            app_id,
            broker=[f"kafka://{h}" for h in settings.kafka_bootstrap_servers.split(",")],
            store="memory://",
            topic_partitions=self.partitions,
            topic_replication_factor=settings.kafka_replication_factor,
            broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_ms / 4000),
            broker_request_timeout=max(30.0, settings.kafka_session_timeout_ms / 1000 + 5),
            broker_commit_interval=settings.stream_commit_interval_ms / 1000,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # aiokafka's 16 KiB default made a checkpoint of 20k entity states wait for
            # hundreds of broker round trips: a full batch blocks send() until it drains
            producer_max_batch_size=PRODUCER_BATCH_BYTES,
            stream_buffer_maxsize=BATCH_MAX * 2,
            web_enabled=False,
            datadir=str(settings.data_path / "faust" / app_id),
            table_cleanup_interval=3600,
            logging_config=None,
            loghandlers=[],
        )
        self.redis = redis_client(settings, asyncio=True)  # a Redis Cluster with FRESHET_REDIS_CLUSTER=on
        self.sink = FeatureSink(settings, registry, self.redis)
        self.crash = self.sink.crash = stream_crash_points(settings.stream_test_crash_at)
        self.markers = RowMarkers(self.redis, app_id)
        self.deadletter = self.app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")
        self.processors: dict[str, ViewProcessor] = {}
        # one "now" for every view of this worker (stream/expiry.py)
        self.clock = StreamClock(ahead_s=settings.stream_clock_ahead_s)
        self.handlers: dict[str, Callable] = {}  # topic -> async handler of a message batch
        self.repartition_topics = {}
        for view in registry.views.values():
            # bytes values: ViewAggregator.encode records, (de)serialised by the processor
            table = self.app.Table(f"state-{view.name}", default=None, partitions=self.partitions,
                                   key_type=bytes, value_type=bytes, extra_topic_configs=topic_config(settings))
            self.processors[view.name] = ViewProcessor(view, table, self.sink, self.clock)
            topic = self.app.topic(f"{app_id}-{view.name}-repartition", partitions=self.partitions,
                                   key_serializer="raw", value_serializer="raw", internal=True,
                                   config=topic_config(settings))
            self.repartition_topics[view.name] = topic
            handler = self.handlers[topic.get_topic_name()] = self._repartitioned_handler(view)
            self.app.agent(topic, name=f"apply-{view.name}")(self._agent(handler))
        self.watermarks: dict[tuple[str, int], float] = {}
        # the next offset each source partition's handler has taken, for the lag it exports
        self.processed: dict[tuple[str, int], int] = {}
        self.marks = WatermarkMarks()  # the watermarks a replay resumes from
        for topic, views in registry.views_by_topic().items():
            decoder = EventDecoder(views, settings.stream_max_future_s, settings.stream_max_event_bytes)
            source = self.app.topic(topic, key_serializer="raw", value_serializer="raw")
            handler = self.handlers[topic] = self._source_handler(topic, views, decoder)
            self.app.agent(source, name=f"ingest-{topic}")(self._agent(handler))
        self._partition_cache: dict[bytes, int] = {}
        self._offline_writer = ThreadPoolExecutor(1, thread_name_prefix="freshet-offline")
        # table snapshots (stream/snapshots.py): taken after commits, loaded by recovery
        self.snapshots: TableSnapshots | None = None
        if settings.stream_snapshot_interval_s:
            from freshet.kafka import broker_incarnation

            log.warning("table snapshots are on (FRESHET_STREAM_SNAPSHOT_INTERVAL_S=%d) and experimental: "
                        "the 10-minute chaos bench lost events with them (a fetch-order race since fixed, not re-run "
                        "with snapshots on yet); set it to 0 "
                        "for the exactly-once guarantees (README, 'Table snapshots')",
                        settings.stream_snapshot_interval_s)
            self.snapshots = TableSnapshots(settings.data_path / "snapshots", broker_incarnation(settings))
        self._snapshot_writer = ThreadPoolExecutor(1, thread_name_prefix="freshet-snapshots")
        self._snapshot_due_at = time.monotonic() + settings.stream_snapshot_interval_s
        self._snapshot_writing: asyncio.Future | None = None
        self._changelog_at: dict[tuple[str, int], int] = {}  # last acknowledged batch's offset per partition
        self._snapshot_at: dict[tuple[str, int], int] = {}  # offset of the newest snapshot per partition
        self._checkpointing = asyncio.Lock()
        self._assigned_at: float | None = None
        self._recovery_from = (0, 0)  # (changelog partitions started from a snapshot, of)
        # (topic, partition) this worker owns: set when an assignment is complete and
        # shrunk only after the revocation's final commit, never from the consumer's
        # assignment mid-rebalance, which can be momentarily empty
        self.owned: set[tuple[str, int]] = set()
        self.app.on_partitions_assigned.connect(self._on_assigned)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.timer(STATS_INTERVAL_S)(self._log_counters)
        self.app.task(self._refresh_forever)
        self.sink.metrics = metrics
        if metrics is not None:
            metrics.attach(self)
            self.app.timer(LAG_INTERVAL_S)(self._export_lag)
        self.versions = VersionBuilds(self, entity_key)  # versions after v0 built from the raw log (stream/versions.py)
        self._recovered_pending = False
        self._refresh_failing = False
        self._stuck_since: dict = {}
        self.positions: ReadPositions | None = None  # the fetch loop's (_deliver_in_bulk)
        # the assigned partitions' tables are recovered (Faust's on_rebalance_complete), until
        # the next rebalance: states may be read as the truth
        self._settled = False
        self.app.on_rebalance_complete.connect(self._on_recovered)
        self._flush_before_commit()
        self._fence_recovery()
        if self.snapshots is not None:
            self._recover_from_snapshots()
        self._seek_where_uncommitted()
        if bulk_delivery:
            self._deliver_in_bulk()

    def _flush_before_commit(self) -> None:
        """Offsets are committed only after what they cover is durable: the offline parts
        on disk, and the table changelog and repartition messages acknowledged by Kafka
        (Faust itself waits only for messages attached to events).

        The committable offsets are taken first, synchronously: every event they cover
        has already queued its offline rows and Kafka sends, so flushing after the
        snapshot covers them, whatever batches run while the flush is awaited.

        Entity states reach the changelog here, once per commit, after the Parquet parts
        of every row they reflect (`checkpoint`): a kill at any point then either replays
        an event (its Redis row rewritten alike, its offline row appended again and
        collapsed by readers) or finds it in the checkpointed state with all its rows
        written. Partitions whose rows Redis lost (RowMarkers) are written back first.
        """
        consumer = self.app.consumer

        async def force_commit(topics=None, start_new_transaction: bool = True) -> bool:
            first = first_acked(consumer)
            offsets = consumer._filter_committable_offsets(
                list(consumer._filter_tps_with_pending_acks(topics)))
            self._note_stuck_offsets(consumer, offsets)
            committed = False
            try:
                await self._restore_lost_rows()
                sent, ends, image = await self.checkpoint()
                if not offsets:
                    if sent:
                        await self.app.producer.flush()
                    self._changelog_durable(ends, image, {})
                    return False
                # anything Faust attached to these offsets goes out now; then everything
                # sent so far (changelog records, repartition batches) is flushed
                await consumer._handle_attached(offsets)
                await self.app.producer.flush()
                self.crash.reached("changelog-flushed")
                committed = await consumer._commit_offsets(offsets, start_new_transaction=start_new_transaction)
            finally:
                give_back_acks(consumer, first, offsets)  # those a failed or cancelled commit took
            if committed:
                self.crash.reached("committed")
                for tp, offset in offsets.items():
                    self.marks.committed(tp.topic, tp.partition, offset)
                self._changelog_durable(ends, image, offsets)  # snapshots only after the commit
            return committed

        consumer.force_commit = force_commit

    def _note_stuck_offsets(self, consumer, offsets: dict) -> None:
        """Log a partition whose processed messages cannot be committed (a message before them
        was never acknowledged): its committed offset stops while the stream goes on."""
        now = time.monotonic()
        for tp, acked in list(consumer._acked.items()):
            if not acked or tp in offsets:
                self._stuck_since.pop(tp, None)
                continue
            since, logged = self._stuck_since.setdefault(tp, (now, now))
            if now - logged >= STUCK_LOG_S:
                self._stuck_since[tp] = (since, now)
                log.warning("offsets of %s[%d] not committable for %.0f s: committed %s, %d acknowledged from %d, "
                            "gaps %s, read offset %s", tp.topic, tp.partition, now - since,
                            consumer._committed_offset.get(tp), len(acked), min(acked),
                            sorted(consumer._gap.get(tp) or ())[:3], consumer._read_offset.get(tp))

    def _seek_where_uncommitted(self) -> None:
        """Make "seek to the committed offsets" seek every source and repartition partition.

        Faust drops what it fetched while its flow was stopped (recovery, a rebalance) and
        counts on that seek to fetch it again, but the Kafka client seeks only where an
        offset above 0 is committed: a partition nobody has committed yet (a new group, or
        two workers starting together) kept its fetch position past the dropped messages,
        which were never processed and held the group's committed offset behind them for
        good. Such a partition is sought to its start (offset 0; a broker that has deleted
        it resets to its earliest, as `consumer_auto_offset_reset` says).
        """
        consumer = self.app.consumer
        seek_to_committed = consumer.seek_to_committed

        async def seek_everywhere() -> dict:
            committed = await seek_to_committed()
            for tp, offset in committed.items():
                if tp.topic in self.handlers and not (offset and offset > 0):
                    await consumer.seek(tp, 0)  # (the fetch loop's ReadPositions sees it)
            return committed

        consumer.seek_to_committed = seek_everywhere

    def _deliver_in_bulk(self) -> None:
        """Hand each fetch of a source or repartition topic to its handler as one batch.

        Faust delivers every message through its own task, queue and stream (about
        6k events/s here, before any work); our handlers take batches anyway, so the
        consumer's fetch loop gives them the fetched messages directly. Other topics
        (table changelogs during recovery) still take Faust's path. Messages are
        tracked and acked as Faust's streams do, so commits and a rebalance's wait for
        in-flight work see them.
        """
        consumer = self.app.consumer
        handlers = self.handlers

        async def process(batches: dict[str, list]) -> None:
            # a fetch can hold a whole backlog: cap the batch so results reach Redis
            # (and offsets a commit) while the rest is still being worked through
            for topic, messages in batches.items():
                for start in range(0, len(messages), BATCH_MAX):
                    batch = messages[start:start + BATCH_MAX]
                    await handlers[topic](batch)
                    for message in batch:
                        consumer.ack(message)

        async def drain(fetcher) -> None:
            callback = consumer.callback
            read_offset = consumer._read_offset
            held = HeldMessages(consumer, lambda m: (m.topic, m.partition) in self.owned,
                                lambda tp: fetch_position(consumer, tp))
            positions = self.positions = ReadPositions(consumer)
            while not (consumer._stopped.is_set() or fetcher._stopped.is_set()):
                batches: dict[str, list] = {}
                await asyncio.sleep(0)
                if held.batches and consumer.flow_active:
                    was_held = [(m.tp, m.offset) for messages in held.batches.values() for m in messages]
                    released = held.release()
                    kept = {(m.tp, m.offset) for messages in released.values() for m in messages}
                    dropped: dict = {}  # the fetcher delivers these again: to be read then
                    for tp, offset in was_held:
                        if (tp, offset) not in kept:
                            dropped[tp] = min(dropped.get(tp, offset), offset)
                    for tp, offset in dropped.items():
                        positions.unread(tp, offset)
                    await process(released)
                before, stale = positions.snapshot(), set()
                async for tp, message in consumer.getmany(timeout=1.0):
                    offset = message.offset
                    last = read_offset[tp]
                    verdict = positions.admit(tp, offset, last, before)
                    if verdict == "stale":
                        stale.add(tp)
                        continue
                    if verdict == "old":
                        if offset == last:
                            self.counters.redelivered += 1
                        continue
                    if verdict == "gap":  # e.g. transaction markers: not to wait for
                        await consumer._add_gap(tp, positions.gap_from(tp, last), offset - 1)
                    positions.read(tp, offset)
                    handler = handlers.get(message.topic)
                    if handler is None:
                        await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
                    else:
                        # what track_message does minus its per-message sensor call (Faust's
                        # monitor counts messages in, and only its own streams count them out)
                        consumer._unacked_messages.add(message)
                        batches.setdefault(message.topic, []).append(message)
                    read_offset[tp] = offset
                for tp in stale:  # what that fetch held of them is fetched again from the seek's offset
                    self.counters.stale_fetches += 1
                    await positions.seek_again(tp)
                # a fetch taken while held messages wait (the flow resumed during it) goes behind
                # them: handed over first, its later offsets made every view take the held events
                # for replays (skipped as duplicates: lost)
                if consumer.flow_active and not held.batches:
                    await process(batches)
                else:
                    held.hold(batches)

        consumer._drain_messages = drain

    async def checkpoint(self) -> tuple[int, dict, dict | None]:
        """Send every changed entity state to its table's changelog, after the Parquet parts
        of the rows they reflect are on disk; returns records sent, the send of each changelog
        partition's last batch, and a snapshot image when one is due (`_snapshot_image`).

        A batch queues its offline rows before it releases its processor's lock, so the
        rows queued when every lock is held cover every state encoded under them: they
        are taken there, and written (in the writer thread, while batches go on) before
        any changelog record is sent. A kill before the records are durable replays the
        events; after, finds them in the states with their rows on disk.

        One checkpoint encodes and sends at a time, so a changelog partition's records are in
        the order their states were encoded: a snapshot taken between two checkpoints holds
        every record before the offsets the first one's sends got.
        """
        async with self._checkpointing:
            return await self._checkpoint()

    async def _checkpoint(self) -> tuple[int, dict, dict | None]:
        t0 = time.perf_counter()
        by_partition: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
        image = None
        for processor in self.processors.values():  # no batch half applied while encoding
            await processor.lock.acquire()
        waited = time.perf_counter() - t0
        t0 += waited
        try:
            # Arrow encodes the parts without the GIL while the states are encoded here
            queued = self.sink.offline.rows
            written = self._write_offline()
            for name, processor in self.processors.items():
                owned = self._owned_partitions(name)
                owner = self._owner_partition
                topic = processor.table.changelog_topic.get_topic_name()
                index = processor.table.data._key_partition  # which partition each key's records go to
                for partition, records in processor.checkpoint(owner, owned, index).items():
                    by_partition.setdefault((topic, partition), []).extend(records)
            self._checkpoint_marks(by_partition)
            self.versions.checkpoint_records(by_partition)
            if self._snapshot_due():
                image = self._snapshot_image(by_partition)
        finally:
            for processor in self.processors.values():
                processor.lock.release()
        # the phase in two: encoding under the locks (the worker's CPU; batches wait) and
        # waiting, for the locks, the parts and the sends (batches go on meanwhile)
        self.counters.timed("checkpoint_encode", t0)
        t0 = time.perf_counter() - waited
        await written
        if queued:
            self.crash.reached("offline-written")
        n, ends = 0, {}
        for i, ((topic, partition), records) in enumerate(by_partition.items()):  # encoded above
            ends[(topic, partition)] = await self._send_records(topic, partition, records)
            n += len(records)
            if i == 0 and len(by_partition) > 1:
                if self.crash.armed("changelog-partial"):
                    await self.app.producer.flush()
                self.crash.reached("changelog-partial")
        if image is not None:
            # where each partition's replay resumes: this checkpoint's last batch, or an earlier
            # one's (acknowledged by an earlier flush); both hold no state newer than the image
            for tp in list(image):
                at = ends.get(tp, self._changelog_at.get(tp))
                if at is None:
                    del image[tp]
                else:
                    image[tp] = (image[tp], at)
        self.counters.changelog_records += n
        self.counters.timed("checkpoint_wait", t0)
        return n, ends, image

    def _snapshot_due(self) -> bool:
        """A snapshot is taken at most every FRESHET_STREAM_SNAPSHOT_INTERVAL_S, of settled tables
        only (mid-recovery a table holds part of a partition), one write at a time."""
        return (self.snapshots is not None and time.monotonic() >= self._snapshot_due_at and self._settled
                and not self.app.in_recovery and (self._snapshot_writing is None or self._snapshot_writing.done()))

    def _snapshot_image(self, by_partition: dict) -> dict:
        """Every owned changelog partition changed since its last snapshot, as rows (under the
        processors' locks: the states as encoded by this checkpoint)."""
        self._snapshot_due_at = time.monotonic() + self.settings.stream_snapshot_interval_s
        image = {}
        for name, processor in self.processors.items():
            topic = processor.table.changelog_topic.get_topic_name()
            changed = {p for p in self._owned_partitions(name)
                       if (topic, p) in by_partition
                       or self._changelog_at.get((topic, p), -1) > self._snapshot_at.get((topic, p), -1)}
            if changed:
                for p, rows in table_image(processor.table.data, processor.chunked, changed).items():
                    image[(topic, p)] = rows
        return image

    def _changelog_durable(self, ends: dict, image: dict | None, sources: dict) -> None:
        """A checkpoint's changelog records are acknowledged (and its offsets committed): note
        where each partition ends, and write the snapshot image, if any, in its own thread."""
        for tp, sent in ends.items():
            if sent.done() and not sent.cancelled() and sent.exception() is None:
                self._changelog_at[tp] = sent.result().offset
        if not image:
            return
        snapshots = []
        for (topic, partition), (rows, at) in image.items():
            if not isinstance(at, int):
                if not at.done() or at.cancelled() or at.exception() is not None:
                    continue
                at = at.result().offset
            snapshots.append(Snapshot(topic, partition, at, self.snapshots.incarnation, rows,
                                      {f"{tp.topic}:{tp.partition}": o for tp, o in sources.items()
                                       if tp.partition == partition}))
        if snapshots:
            self._snapshot_writing = asyncio.ensure_future(self._write_snapshots(snapshots))

    async def _write_snapshots(self, snapshots: list[Snapshot], what: str = "") -> None:
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        rows = 0
        for snapshot in snapshots:
            try:
                await loop.run_in_executor(self._snapshot_writer, self.snapshots.write, snapshot)
            except Exception as exc:  # noqa: BLE001 - the stream goes on; recovery reads more changelog
                self.counters.snapshot_failures += 1
                log.warning("table snapshot of %s[%d] not written (%s: %s); the next one is tried in %d s, and a "
                            "recovery meanwhile reads the changelog from an older snapshot", snapshot.topic,
                            snapshot.partition, type(exc).__name__, exc, self.settings.stream_snapshot_interval_s)
                continue
            self._snapshot_at[(snapshot.topic, snapshot.partition)] = snapshot.offset
            self.counters.snapshots_written += 1
            rows += len(snapshot.rows)
        log.info("table snapshots%s: %d partitions, %d keys, written in %.2f s (%s)", what and f" {what}",
                 len(snapshots), rows, time.monotonic() - t0, ", ".join(f"{s.topic}[{s.partition}]@{s.offset}" for s in snapshots)[:400])

    def _recover_from_snapshots(self) -> None:
        """Make Faust's table recovery start each active changelog partition at its newest
        snapshot (stream/snapshots.py) when that is further on than where it would read from.

        Hooked after Faust sets the offsets recovery reads from (its memory store knows none, so
        from the start, or where this worker's last recovery of the partition stopped) and the
        fenced end offsets (`_fence_recovery`) a snapshot must not be past."""
        recovery = self.app.tables.recovery
        build_offsets = recovery._build_offsets

        async def from_snapshots(consumer, tps, destination, title):
            await build_offsets(consumer, tps, destination, title)
            if title == "active":
                await self._load_snapshots(tps, destination, recovery.active_highwaters)

        recovery._build_offsets = from_snapshots

    async def _load_snapshots(self, tps, destination, highwaters) -> None:
        tables = {p.table.changelog_topic.get_topic_name(): p for p in self.processors.values()}
        loop = asyncio.get_running_loop()
        t0, loaded, skipped = time.monotonic(), [], 0
        for tp in sorted(tps):
            processor = tables.get(tp.topic)
            if processor is None:
                continue
            last = highwaters.get(tp)  # the fence's offset: the changelog's last record
            start = destination.get(tp)
            try:
                snapshot = await loop.run_in_executor(self._snapshot_writer, self.snapshots.newest, tp.topic,
                                                      tp.partition, None if last is None or last < 0 else last + 1)
                if snapshot is None or snapshot.offset - 1 <= (start if start is not None else -1):
                    continue
                n = load_partition(processor.table.data, processor.chunked, tp.partition, snapshot.rows)
            except Exception:  # noqa: BLE001 - a snapshot only saves time: the changelog has it all
                log.exception("loading the table snapshot of %s[%d] failed; its changelog is read instead",
                              tp.topic, tp.partition)
                continue
            destination[tp] = snapshot.offset - 1  # Faust reads the records after this one
            self._snapshot_at[(tp.topic, tp.partition)] = snapshot.offset
            self.counters.snapshots_restored += 1
            skipped += snapshot.offset - max(0, start if start is not None else 0)
            loaded.append(f"{tp.topic}[{tp.partition}]: {n} keys as of offset {snapshot.offset} "
                          f"({time.time() - snapshot.created:.0f} s old), {max(0, (last or 0) - snapshot.offset + 1)} "
                          "records after it to read")
        self._recovery_from = (len(loaded), len([tp for tp in tps if tp.topic in tables]))
        if loaded:
            log.info("table recovery starts from snapshots for %d of %d changelog partitions (%d records not read "
                     "again, loaded in %.2f s): %s", len(loaded), self._recovery_from[1], skipped,
                     time.monotonic() - t0, "; ".join(loaded))

    def _checkpoint_marks(self, by_partition: dict) -> None:
        """Each owned source partition's watermark marks join the checkpoint, in partition p
        of the changelog of the first view reading it (its owner recovers that partition)."""
        for topic, partition in sorted(self.marks.changed):
            if (topic, partition) not in self.owned:
                continue
            table = self.processors[self.registry.views_by_topic()[topic][0].name].table
            key, value = record_key(topic, partition), self.marks.record(topic, partition)
            table.data[key] = value
            table.data._key_partition[key] = partition
            by_partition.setdefault((table.changelog_topic.get_topic_name(), partition), []).append((key, value))

    async def _restore_lost_rows(self, resuming: bool = False) -> None:
        """Write back the live entities of every owned partition whose Redis marker is missing
        (stream/recovery.py), once its table is recovered; the markers are set first.
        `resuming`: called as recovery completes (Faust still reports it in recovery)."""
        if not self._settled or (self.app.in_recovery and not resuming):
            return
        owned = [(name, partition) for name, processor in self.processors.items() if processor.view.online
                 for partition in sorted(self._owned_partitions(name))]
        missing = set(await self.markers.missing(owned))
        if not missing:
            return
        log.warning("Redis at %s holds no rows of %d of the %d partitions this worker writes (%s): restarted "
                    "empty, failed over, flushed, or never written; writing every live entity's current row back "
                    "from state", where(self.redis), len(missing), len(owned),
                    ", ".join(f"{v}[{p}]" for v, p in sorted(missing))[:300])
        await self.markers.mark(sorted(missing), self.sink.online)
        owner = self._owner_partition
        await write_back(self.processors, lambda name: lambda key: (name, owner(key)) in missing, self.sink.online)

    async def _send_records(self, topic: str, partition: int, records: list[tuple[bytes, bytes]]) -> asyncio.Future:
        """Records for one partition as a few full record batches: per-record sends cost
        ~10 us each in Faust's and aiokafka's wrappers, about as much as encoding a state.
        Returns the last send's future (its result's offset: the last batch's first record)."""
        producer = self.app.producer._ensure_producer()
        batch = producer.create_batch()
        last = None
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is not None:
                continue
            if batch.record_count():
                last = await producer.send_batch(batch, topic, partition=partition)
                batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # larger than a batch
                last = await self.app.producer.send(topic, key, value, partition, None, None)
        if batch.record_count():
            last = await producer.send_batch(batch, topic, partition=partition)
        return last

    def _owned_partitions(self, view_name: str) -> set[int]:
        """Partitions whose entities of this view this worker writes now."""
        view = self.registry.views[view_name]
        topic = view.topic if view.keyed_by_message else self.repartition_topics[view_name].get_topic_name()
        return {partition for owned_topic, partition in self.owned if owned_topic == topic}

    def _fence_recovery(self) -> None:
        """Make table recovery read each changelog partition to its true end.

        Faust recovers a partition up to the end offset the broker lists; Tansu lists
        the last record batch's base offset + 1, so recovery stopped before the rest of
        that batch and resumed from stale states (the lost updates after a crash or a
        rebalance). A fence record is written to each partition first and its offset,
        known exactly from the produce acknowledgement, bounds the recovery instead.
        The fence has one fixed key, so compaction keeps a single one.
        """
        consumer = self.app.consumer
        listed_highwaters = consumer.highwaters
        changelogs = {p.table.changelog_topic.get_topic_name() for p in self.processors.values()}

        async def fenced_highwaters(*tps):
            marks = dict(await listed_highwaters(*tps))
            fenced = [tp for tp in tps if tp.topic in changelogs]
            pending = [(tp, await self.app.producer.send(tp.topic, FENCE_KEY, b"1", tp.partition, None, None))
                       for tp in fenced]
            await self.app.producer.flush()
            for tp, ack in pending:
                meta = await ack
                marks[tp] = max(marks.get(tp) or 0, meta.offset + 1)
            return marks

        consumer.highwaters = fenced_highwaters

    async def _on_recovered(self, app, **kwargs) -> None:
        """Tables recovered (Faust awaits this before the stream resumes): rows Redis lost are
        written back now, before any new event is applied. Left to the first commit, the
        write-back came after the first batches and rewrote every live row as of a later clock
        (same values, a newer time: an idle entity looked re-evaluated)."""
        self._settled = True
        if self._assigned_at is not None:
            from_snapshots, of = self._recovery_from
            log.info("tables recovered in %.2f s after the assignment, %.1f s after the worker started (%d of %d "
                     "changelog partitions from a snapshot)", time.monotonic() - self._assigned_at,
                     time.monotonic() - STARTED, from_snapshots, of)
            self._assigned_at, self._recovery_from = None, (0, 0)
        try:
            await self._restore_lost_rows(resuming=True)
        except Exception:  # noqa: BLE001 - a failure here must not stop the rebalance; commits check again
            log.exception("checking Redis for lost rows before resuming failed; the next commit checks again")
        # a new version's partitions are built before any event is applied to them; a failure stops
        # the worker (its successor builds them): resuming would compute the version from nothing
        await self.versions.run()

    async def _on_assigned(self, app, assigned, **kwargs) -> None:
        self.owned = {(tp.topic, tp.partition) for tp in assigned}
        self._assigned_at = time.monotonic()
        log.info("partitions assigned: %s", sorted(self.owned))
        self._recovered_pending = True  # their entities are looked at once their tables are recovered

    async def _refresh_forever(self) -> None:
        """`_refresh_idle` every TICK_S after the previous one ends (a Faust timer would warn
        each time one runs longer than the interval)."""
        next_log = time.monotonic() + STATS_INTERVAL_S
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._refresh_idle()
            except Exception:  # noqa: BLE001 - a bug here must not stop re-evaluation for good
                log.exception("re-evaluating idle entities failed")
            if time.monotonic() >= next_log:
                next_log += STATS_INTERVAL_S
                log.info("rows online %d, of them %d re-evaluations (a tile left a window); %s",
                         self.counters.rows_online, self.counters.rows_expired,
                         {n: f"{p.refresh.looked_at} looked at, {len(p.refresh.schedule)} scheduled"
                          for n, p in self.processors.items()})

    async def _refresh_idle(self) -> None:
        """Rewrite the rows whose windows lost a tile since they were written (stream/expiry.py)."""
        if not (self._settled and self.app.consumer.flow_active) or self.app.in_recovery:
            return  # recovering or rebalancing: tables not settled
        t0 = time.perf_counter()
        for name, processor in self.processors.items():
            owned = self._owned_partitions(name)
            owner = self._owner_partition
            if self._recovered_pending:
                processor.refresh.recovered(processor.stored_entities(lambda key: owner(key) in owned))
            try:
                n = await processor.refresh.run(lambda key: owner(key) in owned, self.counters)
            except Exception as exc:  # noqa: BLE001 - the due entities are kept and retried next tick
                if not self._refresh_failing:  # once per outage, not ten times a second
                    log.warning("view %s: re-evaluating idle entities failed (%s: %s); retrying every %gs",
                                name, type(exc).__name__, exc, TICK_S)
                self._refresh_failing = True
                return
            if self._refresh_failing:
                log.info("re-evaluating idle entities works again")
                self._refresh_failing = False
            self.counters.rows_expired += n
        self._recovered_pending = False
        if self.counters.rows_expired:
            self.counters.timed("refresh", t0)

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        self._settled = False
        self.owned -= {(tp.topic, tp.partition) for tp in revoked}
        self._changelog_at.clear()  # a partition owned again has had other writers: known anew from its sends
        if self.positions is not None:
            self.positions.forget(revoked)
        for tp in revoked:  # whoever reads them next resumes from the checkpointed marks
            self.marks.forget(tp.topic, tp.partition)
            self.watermarks.pop((tp.topic, tp.partition), None)
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))
        for processor in self.processors.values():
            processor.forget()

    async def _export_lag(self) -> None:
        """Records behind each owned source partition's end (the consumer's last fetched high
        watermark, so no broker request), for the metrics endpoint."""
        from faust.types import TP

        consumer = self.app.consumer
        sources = self.registry.views_by_topic()
        behind = {}
        for topic, partition in sorted(self.owned):
            if topic not in sources:
                continue
            try:
                end = consumer.highwater(TP(topic, partition))
            except Exception:  # noqa: BLE001 - not fetched yet, or mid-rebalance: skip this round
                end = None
            if end is not None:
                behind[(topic, partition)] = max(0, end - self.processed.get((topic, partition), end))
        self.sink.metrics.update_lag(behind)

    async def _log_counters(self) -> None:
        c = self.counters
        log.info("accepted %d, dead-lettered %d %s, rerouted %d (%.1f%% of accepted), duplicates skipped %d, "
                 "re-deliveries dropped %d, stale fetches %d, changelog records %d, disowned %s, batches %d; seconds %s", c.accepted,
                 c.deadlettered, c.reasons, c.rerouted, 100.0 * c.rerouted / max(1, c.accepted), c.duplicates_skipped,
                 c.redelivered, c.stale_fetches,
                 c.changelog_records, {n: p.disowned for n, p in self.processors.items()}, c.batches,
                 {k: round(v, 2) for k, v in sorted(c.seconds.items())})

    def _owner_partition(self, key: bytes) -> int:
        p = self._partition_cache.get(key)
        if p is None:
            p = (murmur2(key) & 0x7FFFFFFF) % self.partitions
            if len(self._partition_cache) > 1_000_000:
                self._partition_cache.clear()
            self._partition_cache[key] = p
        return p

    async def _dead_letter(self, message, reason: str) -> None:
        await self._dead_letter_at(message.topic, message.partition, message.offset, message.key,
                                   message.value, reason)

    async def _dead_letter_at(self, topic: str, partition: int, offset: int, key: bytes | None,
                              payload: bytes | None, reason: str) -> None:
        self.counters.deadlettered += 1
        kind = reason.split(":")[0][:40]
        self.counters.reasons[kind] = self.counters.reasons.get(kind, 0) + 1
        if payload and len(payload) > DEADLETTER_PAYLOAD_BYTES:  # the record must stay under ~1 MB
            reason += f" (payload: the first {DEADLETTER_PAYLOAD_BYTES} of {len(payload)} bytes)"
            payload = payload[:DEADLETTER_PAYLOAD_BYTES]
        if key and len(key) > DEADLETTER_PAYLOAD_BYTES // 4:
            key = key[:DEADLETTER_PAYLOAD_BYTES // 4]
        record = DeadLetter.for_event(topic, partition, offset, reason, payload)
        await self.deadletter.send(key=key, value=record.encode())

    async def _dead_letter_items(self, view: ViewSpec, poison: list[tuple[Item, str]], messages=None) -> None:
        """Dead letters for events a view could not apply: the original message when this
        batch holds it, else the fields the view read (the record names the source event)."""
        for (key, ts, row, source, offset), reason in poison:
            topic, _, partition = source.rpartition(":")
            message = messages.get((int(partition), offset)) if messages else None
            if message is not None:
                await self._dead_letter(message, reason)
            else:
                await self._dead_letter_at(topic, int(partition), offset, key,
                                           orjson.dumps({**row, view.timestamp_field: ts}),
                                           reason + " (payload: the fields the view reads)")

    def _source_handler(self, topic: str, views: list[ViewSpec], decoder: EventDecoder):
        """The batch body of a source topic: decode, validate, log raw, apply or repartition."""
        lateness = max(v.lateness_s for v in views)
        raw_root = OfflineStore.of(self.settings).raw(topic)
        ts_field = decoder.timestamp_field
        needed = {v.name: sorted({*v.join_keys, *(a.column for a in v.aggregations)}) for v in views}
        watermarks = self.watermarks
        marks, marks_data = self.marks, self.processors[views[0].name].table.data
        processed = self.processed

        async def ingest(messages: list) -> None:
            self.counters.batches += 1
            t0 = time.perf_counter()
            accepted, rejected = [], []
            decode = decoder.decode
            # one wall-clock reading per batch: the bound on future event times, and the
            # cap on how far a watermark counts (an on-time event is never late because
            # another was dated ahead of the wall clock)
            now = time.time()
            # a batch that does not follow the last one (a replay after a crash, a seek, a new
            # owner) is judged by the watermark as it was at its first offset, not a later one
            firsts, lasts = {}, {}
            for message in messages:
                if message.partition not in firsts:
                    firsts[message.partition] = message.offset
                lasts[message.partition] = message.offset
            for partition, offset in firsts.items():
                watermarks[(topic, partition)] = marks.resume(topic, partition, offset, watermarks.get((topic, partition)),
                                                              marks_data.get(record_key(topic, partition)))
            for message in messages:
                try:
                    ts, row = decode(message.value, now)
                except EventError as exc:
                    rejected.append((message, str(exc)))
                    continue
                except Exception as exc:  # noqa: BLE001 - a decoding bug must not stop the stream
                    rejected.append((message, describe(exc, "decoding")))
                    continue
                wm_key = (message.topic, message.partition)
                high = watermarks.get(wm_key)
                if high is not None and ts < (high if high < now else now) - lateness:
                    rejected.append((message, f"late: event time {ts:.3f} is more than {lateness}s behind "
                                              f"the partition's latest event time {min(high, now):.3f}"))
                    continue
                if high is None or ts > high:
                    watermarks[wm_key] = ts
                row[ts_field] = ts
                accepted.append((message.partition, message.offset, ts, row))
            for partition, offset in lasts.items():
                marks.after(topic, partition, offset + 1, watermarks.get((topic, partition)))
                processed[(topic, partition)] = offset + 1
            for message, reason in rejected:
                await self._dead_letter(message, reason)
            if not accepted:
                return
            by_offset = {(m.partition, m.offset): m for m in messages}
            self.counters.timed("decode", t0)
            t0 = time.perf_counter()
            accepted = await self._append_raw(raw_root, decoder, accepted, by_offset, now)
            self.counters.accepted += len(accepted)
            self.counters.timed("raw_log", t0)
            for view in views:
                if view.keyed_by_message:
                    await self._apply_direct(view, topic, accepted, by_offset, needed[view.name])
                else:
                    await self._repartition(view, topic, accepted, needed[view.name], by_offset)

        return ingest

    @staticmethod
    def _agent(handler):
        """A Faust agent running `handler` on micro-batches: it subscribes the topic, and
        carries the events when bulk delivery is off."""
        async def agent(stream):
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                await handler([event.message for event in events])

        return agent

    async def _apply_direct(self, view: ViewSpec, topic: str, accepted, messages, columns: list[str]) -> None:
        """A view keyed by the message key is computed in the partition the event came in
        when that is its key's murmur2 partition (Java's and aiokafka's partitioner).

        An event elsewhere (another partitioner: librdkafka's default is CRC32) travels
        through the view's repartition topic to the partition owning its key, like every
        event of a view keyed otherwise: correct under any partitioner, one hop dearer.
        """
        items, elsewhere = [], []
        owner_of, cached = self._owner_partition, self._partition_cache.get
        key_of = entity_keys(view)
        sources: dict[int, str] = {}  # "topic:partition", one string per partition
        for event in accepted:
            partition, offset, ts, row = event
            key = key_of(row)
            owner = cached(key)
            if owner is None:
                owner = owner_of(key)
            if owner == partition:
                source = sources.get(partition)
                if source is None:
                    source = sources[partition] = f"{topic}:{partition}"
                items.append((key, ts, row, source, offset))
            else:
                elsewhere.append(event)
        if elsewhere:
            self._note_rerouted(view, len(elsewhere), len(accepted))
            await self._repartition(view, topic, elsewhere, columns, messages)
        if items:
            poison = await self.processors[view.name].apply(items, self.counters)
            await self._dead_letter_items(view, poison, messages)

    def _note_rerouted(self, view: ViewSpec, n: int, of: int) -> None:
        if not self.counters.rerouted:
            log.warning(
                "view %s: %d of %d events arrived outside the partition murmur2 gives their %s: they are "
                "computed after an extra hop through the repartition topic (counted as 'rerouted'). To avoid "
                "the hop, key events by %s with the murmur2 partitioner (Java's and aiokafka's default; "
                "librdkafka/confluent-kafka/kcat: partitioner=murmur2_random)",
                view.name, n, of, view.message_key, view.message_key)
        self.counters.rerouted += n

    async def _repartition(self, view: ViewSpec, topic: str, accepted, columns: list[str], messages) -> None:
        """Every event of the view travels to the partition owning its entity, in messages
        of at most INTERNAL_MESSAGE_BYTES per destination partition, so each entity has
        exactly one writer."""
        outgoing: dict[int, list] = {}
        owner_of, cached = self._owner_partition, self._partition_cache.get
        key_of = entity_keys(view)
        sources: dict[int, str] = {}  # "topic:partition", one string per partition
        for partition, offset, ts, row in accepted:
            key = key_of(row)
            owner = cached(key)
            if owner is None:
                owner = owner_of(key)
            source = sources.get(partition)
            if source is None:
                source = sources[partition] = f"{topic}:{partition}"
            out = outgoing.get(owner)
            if out is None:
                out = outgoing[owner] = []
            out.append((key.decode("latin-1"), ts, {c: row.get(c) for c in columns}, source, offset))
        send = self.repartition_topics[view.name].send
        for owner, items in outgoing.items():
            blobs, failed = split_failures(items, lambda part: (orjson.dumps(part), part))
            for blob, part in blobs:
                for chunk in _bounded(blob, part):
                    await send(key=b"%d" % owner, value=chunk, partition=owner)
            self.counters.repartitioned += len(items) - len(failed)
            for (_, _, _, source, offset), exc in failed:
                partition = int(source.rpartition(":")[2])
                await self._dead_letter(messages[(partition, offset)], describe(exc, f"repartition of {view.name}"))

    def _repartitioned_handler(self, view: ViewSpec):
        async def apply(messages: list) -> None:
            items = []
            for message in messages:
                try:
                    decoded = orjson.loads(message.value)
                except orjson.JSONDecodeError as exc:  # not written by freshet: keep it, go on
                    await self._dead_letter(message, describe(exc, f"repartition of {view.name}"))
                    continue
                for key, ts, row, source, offset in decoded:
                    items.append((key.encode("latin-1"), ts, row, source, offset))
            poison = await self.processors[view.name].apply(items, self.counters)
            await self._dead_letter_items(view, poison)

        return apply

    async def _append_raw(self, root, decoder: EventDecoder, accepted, messages, now: float | None = None) -> list:
        """Queue the accepted events for the offline raw log; returns those that could be
        written (an event the table cannot hold is dead-lettered)."""
        tables, failed = split_failures(accepted, lambda events: _raw_table(decoder, events, now))
        if failed:
            for (partition, offset, _, _), exc in failed:
                await self._dead_letter(messages[(partition, offset)], describe(exc, "raw log"))
            bad = {id(event) for event, _ in failed}
            accepted = [event for event in accepted if id(event) not in bad]
        full = False
        for table in tables:
            full = self.sink.offline.add(root, table, decoder.timestamp_field) or full
        if full:
            await self._write_offline()
        return accepted

    def _write_offline(self) -> asyncio.Future:
        """Take what is queued now and write it in the writer thread; await the future.

        The writer is one thread, so writes finish in the order they were taken: a commit
        that awaits its own write has every earlier one on disk too. A disk that refuses
        (full) is retried there until it takes the parts: the commit waits for them.
        """
        t0 = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(
            self._offline_writer, self.sink.offline.write_patiently, self.sink.offline.take())
        future.add_done_callback(lambda _: self.counters.timed("offline_flush", t0))
        return future

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM."""
        from faust.worker import Worker

        worker = Worker(self.app, loglevel=logging.getLevelName(log.getEffectiveLevel()), quiet=True,
                        redirect_stdouts=False)
        worker.execute_from_commandline()
