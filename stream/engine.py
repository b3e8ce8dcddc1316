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
partition; any other view (merchant views on a topic keyed by card) first sends its
events through an internal repartition topic keyed by its entity.
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import weakref

import aiokafka
import faust
import faust.transport.drivers.aiokafka as faust_aiokafka
import orjson
import pyarrow as pa
import redis.asyncio as aioredis
from aiokafka.partitioner import murmur2
from faust.streams import _current_event

from freshet.contracts import DeadLetter
from freshet.features import FeatureRegistry, ViewSpec
from freshet.settings import Settings
from stream.aggregations import ViewAggregator
from stream.events import EventDecoder, EventError
from stream.offline import PartBuffer, raw_log_path

log = logging.getLogger("freshet.stream")

BATCH_MAX = 5000
BATCH_WITHIN_S = 0.05
SOURCE_FIELDS = ("_partition", "_offset")


def _patch_fetch_wait(ms: int) -> None:
    """Faust passes a hard-coded fetch_max_wait_ms=1500 to aiokafka; that alone costs
    seconds of freshness (DESIGN.md), so its consumer class gets ours."""

    class FastFetchConsumer(aiokafka.AIOKafkaConsumer):
        def __init__(self, *args, **kwargs):
            kwargs["fetch_max_wait_ms"] = ms
            super().__init__(*args, **kwargs)

    shim = types.SimpleNamespace(**{k: getattr(aiokafka, k) for k in dir(aiokafka) if not k.startswith("__")})
    shim.AIOKafkaConsumer = FastFetchConsumer
    faust_aiokafka.aiokafka = shim


def entity_key(view: ViewSpec, row: dict[str, Any]) -> bytes:
    """Table and repartition key: the join key value, or a JSON list for composite keys."""
    if len(view.join_keys) == 1:
        return str(row[view.join_keys[0]]).encode()
    return orjson.dumps([row[k] for k in view.join_keys])


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass
class Counters:
    accepted: int = 0
    deadlettered: int = 0
    duplicates_skipped: int = 0
    repartitioned: int = 0
    rows_online: int = 0
    rows_offline: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # time spent per phase

    def timed(self, phase: str, started: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


class ViewProcessor:
    """Applies events to one view's entity states and emits the changed feature rows."""

    def __init__(self, view: ViewSpec, table, sink: "FeatureSink"):
        self.view = view
        self.agg = ViewAggregator(view)
        self.table = table
        self.sink = sink
        self.live: dict[bytes, dict] = {}

    def forget(self) -> None:
        """Drop working states; after a rebalance the table (changelog) is the truth."""
        self.live.clear()

    def _state(self, key: bytes) -> dict:
        state = self.live.get(key)
        if state is None:
            stored = self.table.get(key)
            # recovered from the changelog as JSON (string tile keys): rebuild
            state = self.agg.new_state() if stored is None else self.agg.from_json(stored)
            self.live[key] = state
        return state

    async def apply(self, items: list[tuple[bytes, float, dict, str, int, Any]], counters: Counters) -> None:
        """Apply (key, event time, row, source "topic:partition", source offset, Faust event)."""
        t0 = time.perf_counter()
        changed: dict[bytes, tuple[dict, dict, Any]] = {}
        for key, ts, row, source, offset, event in items:
            state = self._state(key)
            if state["offsets"].get(source, -1) >= offset:
                counters.duplicates_skipped += 1
                continue
            self.agg.update(state, ts, row)
            state["offsets"][source] = offset
            changed[key] = (state, row, event)
        counters.timed("aggregate", t0)
        if not changed:
            return
        t0 = time.perf_counter()
        rows = []
        for key, (state, row, event) in changed.items():
            self.agg.evict(state)
            # The changelog partition is the partition of the event that brought the
            # update, as for any Faust table; a batch spans partitions, so say which.
            _current_event.set(weakref.ref(event))
            self.table[key] = state
            rows.append((tuple(row[k] for k in self.view.join_keys), self.agg.result(state), state["max_ts"]))
        counters.timed("table_and_result", t0)
        t0 = time.perf_counter()
        await self.sink.write(self.view, rows, counters)
        counters.timed("sink", t0)


class FeatureSink:
    """Writes feature rows online (Redis, Feast layout) and offline (Parquet parts)."""

    def __init__(self, settings: Settings, registry: FeatureRegistry, redis_client):
        from freshet.redis_layout import OnlineLayout

        self.layout = OnlineLayout(registry.project, registry.views)
        self.redis = redis_client
        self.offline = PartBuffer()

    async def write(self, view: ViewSpec, rows: list[tuple[tuple, dict, float]], counters: Counters) -> None:
        if view.online:
            await self.layout.write_async(self.redis, view.name, rows)
            counters.rows_online += len(rows)
        if view.offline_path:
            columns: dict[str, list] = {k: [] for k in view.join_keys}
            columns.update({name: [] for name in view.feature_names})
            stamps = []
            for key_values, values, ts in rows:
                for k, v in zip(view.join_keys, key_values):
                    columns[k].append(v)
                for name in view.feature_names:
                    columns[name].append(values[name])
                stamps.append(_utc(ts))
            table = pa.table({**{k: pa.array(v) for k, v in columns.items()},
                              view.timestamp_field: pa.array(stamps, pa.timestamp("us", tz="UTC")),
                              "created": pa.array([_utc(time.time())] * len(rows), pa.timestamp("us", tz="UTC"))})
            self.offline.add(view.offline_path, table, view.timestamp_field)
            counters.rows_offline += len(rows)


class StreamEngine:
    """Builds the Faust app for every stream feature view in the registry."""

    def __init__(self, settings: Settings, registry: FeatureRegistry, app_id: str = "freshet-stream",
                 partitions: int | None = None):
        _patch_fetch_wait(settings.kafka_fetch_max_wait_ms)
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
            topic_replication_factor=1,
            broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
            broker_heartbeat_interval=max(0.5, settings.kafka_session_timeout_ms / 4000),
            broker_request_timeout=max(30.0, settings.kafka_session_timeout_ms / 1000 + 5),
            broker_commit_interval=1.0,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            stream_buffer_maxsize=BATCH_MAX * 2,
            web_enabled=False,
            datadir=str(settings.data_path / "faust" / app_id),
            table_cleanup_interval=3600,
            logging_config=None,
            loghandlers=[],
        )
        self.redis = aioredis.Redis.from_url(settings.redis_url)
        self.sink = FeatureSink(settings, registry, self.redis)
        self.deadletter = self.app.topic(settings.topic_deadletter, key_serializer="raw", value_serializer="raw")
        self.processors: dict[str, ViewProcessor] = {}
        self.repartition_topics = {}
        for view in registry.views.values():
            table = self.app.Table(f"state-{view.name}", default=None, partitions=self.partitions,
                                   key_type=bytes, value_type=None)
            self.processors[view.name] = ViewProcessor(view, table, self.sink)
            topic = self.app.topic(f"{app_id}-{view.name}-repartition", partitions=self.partitions,
                                   key_serializer="raw", value_serializer="raw", internal=True)
            self.repartition_topics[view.name] = topic
            self.app.agent(topic, name=f"apply-{view.name}")(self._repartitioned_agent(view))
        self.watermarks: dict[tuple[str, int], float] = {}
        for topic, views in registry.views_by_topic().items():
            decoder = EventDecoder(views)
            source = self.app.topic(topic, key_serializer="raw", value_serializer="raw")
            self.app.agent(source, name=f"ingest-{topic}")(self._source_agent(topic, views, decoder))
        self._partition_cache: dict[bytes, int] = {}
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self._flush_before_commit()

    def _flush_before_commit(self) -> None:
        """Offsets are committed only after what they cover is durable: the offline parts
        on disk, and the table changelog and repartition messages acknowledged by Kafka
        (Faust itself waits only for messages attached to events).

        The committable offsets are taken first, synchronously: every event they cover
        has already queued its offline rows and Kafka sends, so flushing after the
        snapshot covers them, whatever batches run while the flush is awaited.
        """
        consumer = self.app.consumer

        async def force_commit(topics=None, start_new_transaction: bool = True) -> bool:
            offsets = consumer._filter_committable_offsets(
                list(consumer._filter_tps_with_pending_acks(topics)))
            self.flush_offline()
            if not offsets:
                return False
            # messages Faust attached to these offsets (table changelog writes) go out
            # now; then everything sent so far, repartition batches included, is flushed
            await consumer._handle_attached(offsets)
            await self.app.producer.flush()
            return await consumer._commit_offsets(offsets, start_new_transaction=start_new_transaction)

        consumer.force_commit = force_commit

    async def _on_revoked(self, app, revoked, **kwargs) -> None:
        for processor in self.processors.values():
            processor.forget()

    def _owner_partition(self, key: bytes) -> int:
        p = self._partition_cache.get(key)
        if p is None:
            p = (murmur2(key) & 0x7FFFFFFF) % self.partitions
            if len(self._partition_cache) > 1_000_000:
                self._partition_cache.clear()
            self._partition_cache[key] = p
        return p

    async def _dead_letter(self, message, reason: str) -> None:
        self.counters.deadlettered += 1
        kind = reason.split(":")[0][:40]
        self.counters.reasons[kind] = self.counters.reasons.get(kind, 0) + 1
        record = DeadLetter.for_event(message.topic, message.partition, message.offset, reason, message.value)
        await self.deadletter.send(key=message.key, value=record.encode())

    def _source_agent(self, topic: str, views: list[ViewSpec], decoder: EventDecoder):
        lateness = max(v.lateness_s for v in views)
        raw_root = raw_log_path(self.settings.data_path, topic)
        ts_field = decoder.timestamp_field
        needed = {v.name: sorted({*v.join_keys, *(a.column for a in v.aggregations)}) for v in views}

        async def ingest(stream):
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                self.counters.batches += 1
                t0 = time.perf_counter()
                accepted = []
                for event in events:
                    message = event.message
                    try:
                        ts, row = decoder.decode(message.value)
                    except EventError as exc:
                        await self._dead_letter(message, str(exc))
                        continue
                    wm_key = (message.topic, message.partition)
                    high = self.watermarks.get(wm_key)
                    if high is not None and ts < high - lateness:
                        await self._dead_letter(
                            message, f"late: event time {ts:.3f} is more than {lateness}s behind "
                                     f"the partition's latest event time {high:.3f}")
                        continue
                    if high is None or ts > high:
                        self.watermarks[wm_key] = ts
                    row[ts_field] = ts
                    accepted.append((message.partition, message.offset, ts, row))
                if not accepted:
                    continue
                events_by_offset = {(e.message.partition, e.message.offset): e for e in events}
                self.counters.accepted += len(accepted)
                self.counters.timed("decode", t0)
                t0 = time.perf_counter()
                await self._append_raw(raw_root, decoder, accepted)
                self.counters.timed("raw_log", t0)
                for view in views:
                    if view.keyed_by_message:
                        await self._apply_direct(view, topic, accepted, events_by_offset)
                    else:
                        await self._repartition(view, topic, accepted, needed[view.name])

        return ingest

    async def _apply_direct(self, view: ViewSpec, topic: str, accepted, events) -> None:
        """A view keyed by the message key is computed in the partition the event came in.

        Each entity must then always arrive in the same partition, the one its key maps
        to; an event that does not is dead-lettered rather than split across two states.
        """
        items = []
        for partition, offset, ts, row in accepted:
            key = entity_key(view, row)
            owner = self._owner_partition(key)
            if owner != partition:
                await self._dead_letter(
                    events[(partition, offset)].message,
                    f"misrouted: {view.message_key}={key.decode(errors='replace')!r} belongs in partition "
                    f"{owner}, arrived in {partition}; key events by {view.message_key} with the murmur2 "
                    "partitioner (Java's default; librdkafka 'murmur2_random')")
                continue
            items.append((key, ts, row, f"{topic}:{partition}", offset, events[(partition, offset)]))
        if items:
            await self.processors[view.name].apply(items, self.counters)

    async def _repartition(self, view: ViewSpec, topic: str, accepted, columns: list[str]) -> None:
        """Every event of the view travels to the partition owning its entity, one message
        per destination partition, so each entity has exactly one writer."""
        outgoing: dict[int, list] = {}
        for partition, offset, ts, row in accepted:
            key = entity_key(view, row)
            outgoing.setdefault(self._owner_partition(key), []).append(
                (key.decode("latin-1"), ts, {c: row.get(c) for c in columns}, f"{topic}:{partition}", offset))
        for owner, items in outgoing.items():
            await self.repartition_topics[view.name].send(key=b"%d" % owner, value=orjson.dumps(items),
                                                          partition=owner)
            self.counters.repartitioned += len(items)

    def _repartitioned_agent(self, view: ViewSpec):
        async def apply(stream):
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                items = []
                for event in events:
                    for key, ts, row, source, offset in orjson.loads(event.message.value):
                        items.append((key.encode("latin-1"), ts, row, source, offset, event))
                await self.processors[view.name].apply(items, self.counters)

        return apply

    async def _append_raw(self, root, decoder: EventDecoder, accepted) -> None:
        columns: dict[str, list] = {name: [] for name in decoder.schema}
        parts, offsets = [], []
        for partition, offset, ts, row in accepted:
            for name in columns:
                columns[name].append(row.get(name))
            parts.append(partition)
            offsets.append(offset)
        arrays = {}
        for name, values in columns.items():
            kind = decoder.schema[name]
            if name == decoder.timestamp_field or kind == "timestamp":
                arrays[name] = pa.array([_utc(v) if isinstance(v, (int, float)) else None for v in values],
                                        pa.timestamp("us", tz="UTC"))
            else:
                arrays[name] = pa.array(values, {"string": pa.string(), "int": pa.int64(),
                                                 "float": pa.float64(), "bool": pa.bool_()}[kind])
        arrays["_partition"] = pa.array(parts, pa.int32())
        arrays["_offset"] = pa.array(offsets, pa.int64())
        if self.sink.offline.add(root, pa.table(arrays), decoder.timestamp_field):
            self.flush_offline()

    def flush_offline(self) -> None:
        t0 = time.perf_counter()
        self.sink.offline.flush()
        self.counters.timed("offline_flush", t0)

    def run(self) -> None:
        """Run the worker until SIGINT/SIGTERM."""
        from faust.worker import Worker

        worker = Worker(self.app, loglevel=logging.getLevelName(log.getEffectiveLevel()), quiet=True,
                        redirect_stdouts=False)
        worker.execute_from_commandline()
