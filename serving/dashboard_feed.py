"""What the live dashboard shows, gathered in one background thread: one JSON snapshot a second.

Owns the readings behind /ui: freshet's Kafka topics (drift, models, dead letters, predictions,
labels), the stream group's offsets and lag, a freshness probe, and this process's API metrics.

Sources, all read without joining a consumer group (nothing is committed, no rebalance):
- freshet.drift, freshet.models, freshet.deadletter: from the beginning, the newest kept;
- freshet.predictions and freshet.labels: from the beginning, for the drift statistic per
  model input (recent mean against the first values seen, in reference standard deviations:
  the monitor's own `shift:` gauge) and the labelled error rate per model version;
- the event topics of the Feast registry: high watermarks (events in), the stream group's
  committed offsets (processed, lag per partition), and a sample of events whose arrival in
  Redis is watched (freshness = first time Redis shows the event - its Kafka timestamp).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

import orjson

from freshet.contracts import ContractError, DeadLetter, DriftAlert, Label, ModelEvent, Prediction
from freshet.settings import Settings
from freshet.times import to_epoch

log = logging.getLogger("freshet.serving.dashboard")

HISTORY = 300             # points per time series: five minutes at one a second
RATE_SPAN_S = 5.0         # rates are averaged over this many seconds (the stream commits once a second)
KEEP_ALERTS = 200
KEEP_DEADLETTERS = 20
KEEP_MODEL_EVENTS = 200
JOIN_LIMIT = 200_000      # predictions waiting for their label, oldest dropped first
FRESHNESS_SAMPLES = 20    # events watched per second at most
FRESHNESS_GIVE_UP_S = 30.0
SHIFT_SAMPLES = 50        # predictions a second fed to the drift statistic (37 inputs cost ~0.1 ms each)
FRESHNESS_READ_WITHIN_S = 2.0  # events this dashboard reads later than this are not sampled: it would time itself


class Series:
    """A bounded time series of (epoch seconds, value) points.

    >>> s = Series(maxlen=2)
    >>> for t, v in ((1, 1.0), (2, 2.0), (3, None)):
    ...     s.add(t, v)
    >>> s.points()
    [[2, 2.0], [3, None]]
    """

    __slots__ = ("_points",)

    def __init__(self, maxlen: int = HISTORY):
        self._points: deque = deque(maxlen=maxlen)

    def add(self, t: float, value: float | None) -> None:
        self._points.append([round(t, 1), value])  # tenths of a second: the snapshot is sent every second

    def points(self) -> list[list]:
        return [list(p) for p in self._points]


class Counted:
    """The per-second rate of an ever-growing count, averaged over the last `span_s` seconds.

    >>> c = Counted(span_s=2.0)
    >>> c.update(0.0, 100), c.update(1.0, 110), c.update(2.0, 130), c.update(3.0, 130)
    (None, 10.0, 15.0, 10.0)
    """

    __slots__ = ("span_s", "_seen")

    def __init__(self, span_s: float = RATE_SPAN_S):
        self.span_s = span_s
        self._seen: deque = deque()

    def update(self, t: float, count: float) -> float | None:
        self._seen.append((t, count))
        while len(self._seen) > 2 and t - self._seen[1][0] >= self.span_s:
            self._seen.popleft()
        t0, c0 = self._seen[0]
        return None if t <= t0 else max(0.0, (count - c0) / (t - t0))


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of values (nearest rank), None for none.

    >>> quantile([5, 1, 3, 2, 4], 0.5), quantile([5, 1, 3, 2, 4], 0.99), quantile([], 0.5)
    (3, 5, None)
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def histogram_quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram's observations (per-bucket counts, the last +Inf), as the
    upper bound of the bucket it falls in; the last finite bound for the +Inf bucket.

    >>> histogram_quantile((0.001, 0.01, 0.1), [50, 45, 5, 0], 0.5)
    0.001
    >>> histogram_quantile((0.001, 0.01, 0.1), [50, 45, 5, 0], 0.99)
    0.1
    """
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


# --- Kafka topics ---------------------------------------------------------------------------

class AlertFeed:
    """Drift alerts, newest last, and which subjects have been alerted on."""

    def __init__(self):
        self.alerts: deque = deque(maxlen=KEEP_ALERTS)
        self.total = 0

    def observe(self, alert: DriftAlert) -> None:
        self.total += 1
        self.alerts.append({"alert_id": alert.alert_id, "model": alert.model, "version": str(alert.model_version),
                            "kind": alert.kind, "subject": alert.subject, "detector": alert.detector,
                            "statistic": alert.statistic, "threshold": alert.threshold, "ts": alert.ts})

    def view(self) -> dict[str, Any]:
        return {"total": self.total, "latest": list(self.alerts)[-50:]}


class ModelTimeline:
    """Promotions and rollbacks from the models topic: a promotion of a version that had been
    promoted before, replacing a newer one, is a rollback."""

    def __init__(self):
        self.events: deque = deque(maxlen=KEEP_MODEL_EVENTS)
        self._promoted: dict[str, list[str]] = {}

    def observe(self, event: ModelEvent) -> None:
        history = self._promoted.setdefault(event.model, [])
        version = str(event.version)
        kind = "promotion"
        if event.stage != "champion":  # a shadow, a canary, one cleared, a rollback's verdict: not who serves
            kind = event.stage
        elif version in history and history[-1] != version:
            kind = "rollback"
        elif history and history[-1] == version:
            kind = "announcement"
        if event.stage == "champion":
            history.append(version)
        metrics = {k: v for k, v in (event.metrics or {}).items() if isinstance(v, (int, float))}
        self.events.append({"model": event.model, "version": version, "stage": event.stage, "kind": kind,
                            "metrics": dict(list(metrics.items())[:6]), "ts": event.ts})

    def versions(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys((e["model"], e["version"]) for e in self.events))

    def current(self) -> dict[str, str]:
        return {model: history[-1] for model, history in self._promoted.items() if history}

    def view(self) -> dict[str, Any]:
        return {"events": list(self.events), "current": self.current()}


class DeadLetterFeed:
    """The newest dead letters' reasons and the count per reason."""

    def __init__(self):
        self.latest: deque = deque(maxlen=KEEP_DEADLETTERS)
        self.reasons: dict[str, int] = {}
        self.total = 0

    def observe(self, letter: DeadLetter) -> None:
        self.total += 1
        reason = letter.error.split(":")[0][:80]
        if reason in self.reasons or len(self.reasons) < 50:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.latest.append({"topic": letter.topic, "partition": letter.partition, "offset": letter.offset,
                            "error": letter.error[:200], "ts": letter.ts})

    def view(self) -> dict[str, Any]:
        top = sorted(self.reasons.items(), key=lambda kv: -kv[1])[:8]
        return {"total": self.total, "latest": list(self.latest)[::-1][:8], "reasons": top}


class InputShift:
    """Per model input: how far the recent mean moved from the first values seen, in the first
    values' standard deviations (what the monitor's `shift:<input>` gauge reports).

    >>> shift = InputShift(reference=4, recent=2)
    >>> for v in (1.0, 2.0, 3.0, 4.0, 10.0, 10.0):
    ...     shift.observe({"amount": v, "country": "FR"})
    >>> round(shift.statistics()["amount"], 2)
    5.81
    """

    def __init__(self, reference: int = 500, recent: int = 200):
        self.reference_n = reference
        self.recent_n = recent
        self._ref: dict[str, list[float]] = {}      # name -> [n, mean, m2]
        self._recent: dict[str, deque] = {}
        self._sums: dict[str, float] = {}

    def observe(self, features: dict[str, Any]) -> None:
        for name, value in features.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            ref = self._ref.get(name)
            if ref is None:
                if len(self._ref) >= 64:
                    continue
                ref = self._ref[name] = [0, 0.0, 0.0]
                self._recent[name] = deque()
                self._sums[name] = 0.0
            if ref[0] < self.reference_n:
                ref[0] += 1
                delta = value - ref[1]
                ref[1] += delta / ref[0]
                ref[2] += delta * (value - ref[1])
                continue
            recent = self._recent[name]
            recent.append(value)
            self._sums[name] += value
            if len(recent) > self.recent_n:
                self._sums[name] -= recent.popleft()

    def statistics(self) -> dict[str, float]:
        out = {}
        for name, (n, mean, m2) in self._ref.items():
            recent = self._recent[name]
            if n < self.reference_n or not recent:
                continue
            sd = math.sqrt(m2 / (n - 1)) if n > 1 else 0.0
            shift = abs(self._sums[name] / len(recent) - mean)
            out[name] = shift / sd if sd > 1e-12 else (0.0 if shift < 1e-12 else float("inf"))
        return {k: (v if math.isfinite(v) else 99.0) for k, v in out.items()}


class VersionErrors:
    """Labelled error rate per model version: predictions joined with their labels by request id."""

    def __init__(self, limit: int = JOIN_LIMIT):
        self.limit = limit
        self._waiting: OrderedDict[str, tuple[str, str, int]] = OrderedDict()  # request id -> (model, version, label)
        self.outcomes: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [labelled, wrong]
        self.predictions: dict[tuple[str, str], int] = {}

    def predicted(self, p: Prediction) -> None:
        key = (p.model, str(p.model_version))
        self.predictions[key] = self.predictions.get(key, 0) + 1
        label = p.prediction.get("label") if isinstance(p.prediction, dict) else None
        if label is None:
            label = int(p.score >= 0.5)
        self._waiting[p.request_id] = (p.model, str(p.model_version), int(label))
        if len(self._waiting) > self.limit:
            self._waiting.popitem(last=False)

    def labelled(self, label: Label) -> None:
        if not label.request_id:
            return
        seen = self._waiting.pop(label.request_id, None)
        if seen is None:
            return
        model, version, predicted = seen
        counts = self.outcomes.setdefault((model, version), [0, 0])
        counts[0] += 1
        counts[1] += int(predicted != int(bool(label.label)))

    def view(self, known: Iterable[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        """A row per version that answered predictions or is in `known` (promoted ones)."""
        rows = []
        counts = {key: 0 for key in known}
        counts.update(self.predictions)
        for (model, version), n in counts.items():
            labelled, wrong = self.outcomes.get((model, version), (0, 0))
            rows.append({"model": model, "version": version, "predictions": n, "labelled": labelled,
                         "error_rate": wrong / labelled if labelled else None})
        return sorted(rows, key=lambda r: (r["model"], _version_order(r["version"])))


def _version_order(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# --- the stream's progress -------------------------------------------------------------------

class StreamProgress:
    """Events in (high watermarks of the event topics) and processed (the stream group's committed
    offsets) per second, and lag per partition."""

    def __init__(self, consumer: Any, topics: Iterable[str], group: str):
        self.consumer = consumer   # a consumer of `group` that never subscribes: it only reads offsets
        self.topics = sorted(set(topics))
        self.group = group
        self.partitions: list = []
        self.produced = Counted()
        self.processed = Counted()
        self.in_rate = Series()
        self.out_rate = Series()
        self.lag: dict[str, int | None] = {}
        self._lock = threading.Lock()  # sampled in OffsetSampler's thread, viewed in the feed's

    def _discover(self) -> None:
        from confluent_kafka import TopicPartition

        meta = self.consumer.list_topics(timeout=5).topics
        self.partitions = [TopicPartition(t, p) for t in self.topics if t in meta
                           for p in sorted(meta[t].partitions)]

    def sample(self, now: float) -> None:
        if not self.partitions:
            self._discover()
            if not self.partitions:
                return
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in self.consumer.committed(self.partitions, timeout=2)}
        high = {(tp.topic, tp.partition): self.consumer.get_watermark_offsets(tp, timeout=2)[1]
                for tp in self.partitions}
        # committed first, so high read after it is never below it
        lag = {f"{t}[{p}]": (max(0, high[(t, p)] - c) if c >= 0 else None) for (t, p), c in committed.items()}
        with self._lock:
            self.lag = lag
            self.in_rate.add(now, _rounded(self.produced.update(now, sum(high.values()))))
            self.out_rate.add(now, _rounded(self.processed.update(now, sum(max(c, 0) for c in committed.values()))))

    def view(self) -> dict[str, Any]:
        with self._lock:
            return self._view()

    def _view(self) -> dict[str, Any]:
        known = [v for v in self.lag.values() if v is not None]
        return {"group": self.group, "topics": self.topics, "in": self.in_rate.points(),
                "processed": self.out_rate.points(), "lag": self.lag,
                "lag_total": sum(known) if known else None}


class OffsetSampler(threading.Thread):
    """Samples StreamProgress once a second in its own thread: offset look-ups are broker round
    trips that can take seconds on a busy broker, and must not hold up reading the topics."""

    def __init__(self, progress: StreamProgress, problems: dict, stop_event: threading.Event):
        super().__init__(name="freshet-dashboard-offsets", daemon=True)
        self.progress = progress
        self.problems = problems
        self.stop_event = stop_event

    def run(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self.progress.sample(time.time())
                self.problems.pop("offsets", None)
            except Exception as exc:  # noqa: BLE001 - shown on the page; the next second tries again
                self.problems["offsets"] = f"{type(exc).__name__}: {exc}"[:300]
            self.stop_event.wait(max(0.05, 1.0 - (time.monotonic() - started)))
        try:
            self.progress.consumer.close()
        except Exception:  # noqa: BLE001
            pass


class FreshnessProbe:
    """Freshness of a sample of events: the first time Redis shows the event's time for every
    online view of its topic, minus the Kafka timestamp its producer set. Polled every tick
    (~100 ms resolution), like the demo's client probe but sampled."""

    def __init__(self, layout: Any, views_by_topic: dict[str, list], redis_client: Any):
        self.layout = layout
        self.views_by_topic = views_by_topic
        self.redis = redis_client
        self.pending: list[tuple[float, float, list, list]] = []  # kafka ts, event ts, rows, seen
        self.done: deque = deque()  # (finished at, freshness ms)
        self._budget, self._second = 0, 0
        self.read_behind_s: float | None = None  # how late this dashboard reads the newest event
        self._last_read = 0.0
        self.p50 = Series()
        self.p99 = Series()

    def offer(self, topic: str, kafka_ts_ms: int, raw: bytes, now: float) -> None:
        second = int(now)
        if second != self._second:
            self._second, self._budget = second, FRESHNESS_SAMPLES
        if kafka_ts_ms <= 0:
            return
        self.read_behind_s = max(0.0, now - kafka_ts_ms / 1000.0)
        self._last_read = now
        if self._budget <= 0 or self.read_behind_s > FRESHNESS_READ_WITHIN_S:
            return
        views = self.views_by_topic.get(topic)
        if not views:
            return
        try:
            event = orjson.loads(raw)
            rows = []
            for v in views:
                keys = tuple(event[k] for k in v.join_keys)
                rows.append((self.layout.entity_key(v.name, keys), self.layout.ts_field(v.name)))
            event_ts = to_epoch(event[views[0].timestamp_field])
        except Exception:  # noqa: BLE001 - a bad event is the stream's to dead-letter, not ours
            return
        self._budget -= 1
        self.pending.append((kafka_ts_ms / 1000.0, event_ts, rows, [False] * len(rows)))

    def poll(self, now: float) -> None:
        if not self.pending:
            return
        from freshet.redis_layout import decode_timestamp

        pipe = self.redis.pipeline(transaction=False)
        wanted = [(i, j) for i, item in enumerate(self.pending) for j, seen in enumerate(item[3]) if not seen]
        for i, j in wanted:
            key, ts_field = self.pending[i][2][j]
            pipe.hget(key, ts_field)
        for (i, j), raw in zip(wanted, pipe.execute()):
            ts = decode_timestamp(raw)
            if ts is not None and ts >= self.pending[i][1] - 1e-6:
                self.pending[i][3][j] = True
        still = []
        for item in self.pending:
            if all(item[3]):
                self.done.append((now, max(0.0, (now - item[0]) * 1000.0)))
            elif now - item[0] < FRESHNESS_GIVE_UP_S:
                still.append(item)
        self.pending = still

    def sample(self, now: float) -> None:
        while self.done and now - self.done[0][0] > 10.0:
            self.done.popleft()
        values = [ms for _, ms in self.done]
        self.p50.add(now, _rounded(quantile(values, 0.5)))
        self.p99.add(now, _rounded(quantile(values, 0.99)))

    def view(self) -> dict[str, Any]:
        return {"p50_ms": self.p50.points(), "p99_ms": self.p99.points(), "waiting": len(self.pending),
                # a reading from before the events stopped says nothing about now
                "read_behind_s": _rounded(self.read_behind_s) if time.time() - self._last_read < 5.0 else None}


class ApiStats:
    """This serving process's request rate and latency quantiles, from its ServingMetrics."""

    def __init__(self, metrics: Any, bounds: tuple[float, ...]):
        self.metrics = metrics
        self.bounds = bounds
        self.count = Counted()
        self.rate = Series()
        self.p50 = Series()
        self.p99 = Series()
        self.errors = Series()
        self._counts: deque = deque()  # (t, per-bucket counts summed over API endpoints)

    def _api(self, endpoint: str) -> bool:
        return endpoint != "other" and not endpoint.startswith("/ui")

    def sample(self, now: float) -> None:
        requests = dict(self.metrics.requests)
        total = sum(n for (endpoint, _), n in requests.items() if self._api(endpoint))
        failed = sum(n for (endpoint, status), n in requests.items() if self._api(endpoint) and status >= 500)
        self.rate.add(now, _rounded(self.count.update(now, total)))
        buckets = [0] * (len(self.bounds) + 1)
        for endpoint, hist in list(self.metrics.latency.items()):
            if self._api(endpoint):
                for i, n in enumerate(hist.counts):
                    buckets[i] += n
        self._counts.append((now, buckets, failed))
        while len(self._counts) > 2 and now - self._counts[1][0] >= RATE_SPAN_S:
            self._counts.popleft()
        _, before, failed_before = self._counts[0]
        recent = [a - b for a, b in zip(buckets, before)]
        ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
        self.p50.add(now, ms(histogram_quantile(self.bounds, recent, 0.5)))
        self.p99.add(now, ms(histogram_quantile(self.bounds, recent, 0.99)))
        self.errors.add(now, failed - failed_before)

    def view(self) -> dict[str, Any]:
        return {"rate": self.rate.points(), "p50_ms": self.p50.points(), "p99_ms": self.p99.points(),
                "errors_5xx": self.errors.points()}


def _close(client: Any) -> None:
    if client is not None:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing after a failure: nothing more to do
            pass


def _rounded(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


# --- the feed ---------------------------------------------------------------------------------

class LiveFeed(threading.Thread):
    """The dashboard's one background thread: reads, and once a second publishes a snapshot.

    `snapshot` is the newest JSON (bytes) and `version` counts them; readers wait on `tick`.
    """

    def __init__(self, settings: Settings, *, layout: Callable[[], Any], registry: Callable[[], Any],
                 api: ApiStats, stream_group: str, extra: Callable[[], dict] | None = None):
        super().__init__(name="freshet-dashboard-feed", daemon=True)
        self.settings = settings
        self._layout = layout
        self._registry = registry
        self.api = api
        self.stream_group = stream_group
        self.extra = extra or (lambda: {})
        self.alerts = AlertFeed()
        self.models = ModelTimeline()
        self.deadletters = DeadLetterFeed()
        self.shift = InputShift()
        self.errors = VersionErrors()
        self.drift_series: dict[str, Series] = {}
        self.deadletter_count = Counted()
        self.deadletter_rate = Series()
        self.progress: StreamProgress | None = None
        self.freshness: FreshnessProbe | None = None
        self.problems: dict[str, str] = {}
        self.snapshot = b"{}"
        self.version = 0
        self.tick = threading.Condition()
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self.records = 0
        self._shift_budget, self._shift_second = 0, 0

    # -- set-up --------------------------------------------------------------------------

    def _open(self):
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        from freshet import kafka

        s = self.settings
        registry = self._registry()
        views_by_topic = {t: [v for v in vs if v.online] for t, vs in registry.views_by_topic().items()}
        reader = kafka.consumer(s, f"freshet-dashboard-{id(self):x}", **{"fetch.wait.max.ms": 100,
                                                                        "enable.partition.eof": False})
        meta = reader.list_topics(timeout=10).topics
        from_start = (s.topic_drift, s.topic_models, s.topic_deadletter, s.topic_predictions, s.topic_labels)
        assignment = [TopicPartition(t, p, OFFSET_BEGINNING) for t in from_start if t in meta
                      for p in meta[t].partitions]
        assignment += [TopicPartition(t, p, OFFSET_END) for t in views_by_topic if t in meta
                       for p in meta[t].partitions]
        self._assigned = {tp.topic for tp in assignment}
        reader.assign(assignment)
        if self.progress is None:
            offsets = kafka.consumer(s, self.stream_group)  # never subscribes: reads the group's offsets
            self.progress = StreamProgress(offsets, views_by_topic, self.stream_group)
            OffsetSampler(self.progress, self.problems, self.stop_event).start()
        from freshet.endpoints import redis_client

        self.freshness = FreshnessProbe(self._layout(), views_by_topic, redis_client(s, socket_timeout=2))
        return reader

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        reader = None
        next_sample = 0.0
        while not self.stop_event.is_set():
            try:
                if reader is None:
                    reader = self._open()
                    self.problems.pop("kafka", None)
                for msg in reader.consume(2000, 0.1):
                    if not msg.error():
                        self._route(msg)
                now = time.time()
                self._safely("redis", self.freshness.poll, now)
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + 1.0
                    self._sample(now)
            except Exception as exc:  # noqa: BLE001 - show it on the page and try again
                self.problems["kafka"] = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("dashboard feed: %s", exc)
                _close(reader)
                reader = None
                self._sample(time.time())
                self.stop_event.wait(2.0)
        _close(reader)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=5)

    def _safely(self, what: str, fn: Callable, *args) -> None:
        try:
            fn(*args)
            self.problems.pop(what, None)
        except Exception as exc:  # noqa: BLE001 - one part failing keeps the rest of the page live
            self.problems[what] = f"{type(exc).__name__}: {exc}"[:300]

    def _route(self, msg: Any) -> None:
        s, topic, value = self.settings, msg.topic(), msg.value()
        self.records += 1
        try:
            if topic == s.topic_predictions:
                p = Prediction.decode(value)
                self.errors.predicted(p)
                if self._shift_allowed():
                    self.shift.observe(p.features)
            elif topic == s.topic_labels:
                self.errors.labelled(Label.decode(value))
            elif topic == s.topic_drift:
                self.alerts.observe(DriftAlert.decode(value))
            elif topic == s.topic_models:
                self.models.observe(ModelEvent.decode(value))
            elif topic == s.topic_deadletter:
                self.deadletters.observe(DeadLetter.decode(value))
            else:
                self.freshness.offer(topic, msg.timestamp()[1], value, time.time())
        except ContractError:
            pass  # the monitor and the stream report such records; the page shows what it can read

    def _shift_allowed(self) -> bool:
        """A sample of predictions is enough for a recent mean; every one is not, on a busy server."""
        second = int(time.monotonic())
        if second != self._shift_second:
            self._shift_second, self._shift_budget = second, SHIFT_SAMPLES
        self._shift_budget -= 1
        return self._shift_budget >= 0

    def _sample(self, now: float) -> None:
        if self.freshness is not None:
            self.freshness.sample(now)
        self._safely("api", self.api.sample, now)
        for name, value in self.shift.statistics().items():
            series = self.drift_series.get(name)
            if series is None:
                series = self.drift_series[name] = Series()
            series.add(now, round(value, 4))
        self.deadletter_rate.add(now, _rounded(self.deadletter_count.update(now, self.deadletters.total), 3))
        self._publish(now)

    def view(self, now: float) -> dict[str, Any]:
        alerted = {}
        for a in self.alerts.alerts:
            alerted.setdefault(a["subject"], []).append([a["ts"], a["statistic"], a["kind"]])
        drift = [{"subject": name, "points": series.points(), "alerts": alerted.pop(name, [])}
                 for name, series in sorted(self.drift_series.items())]
        drift += [{"subject": name, "points": [], "alerts": marks} for name, marks in sorted(alerted.items())]
        return {
            "now": now, "since": self.started_at, "records": self.records,
            "stream": self.progress.view() if self.progress else None,
            "freshness": self.freshness.view() if self.freshness else None,
            "deadletters": {**self.deadletters.view(), "rate": self.deadletter_rate.points()},
            "api": self.api.view(),
            "drift": drift,
            "alerts": self.alerts.view(),
            "models": {**self.models.view(), "versions": self.errors.view(self.models.versions())},
            "problems": dict(self.problems),
            **self.extra(),
        }

    def _publish(self, now: float) -> None:
        blob = orjson.dumps(self.view(now), option=orjson.OPT_SERIALIZE_NUMPY)
        with self.tick:
            self.snapshot = blob
            self.version += 1
            self.tick.notify_all()

    def wait_newer(self, version: int, timeout: float) -> tuple[int, bytes]:
        """The snapshot after `version`, waiting up to `timeout` seconds (then the current one)."""
        with self.tick:
            if self.version <= version:
                self.tick.wait(timeout)
            return self.version, self.snapshot
