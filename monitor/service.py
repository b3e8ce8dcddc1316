"""`freshet monitor` and `freshet alerts`: the DriftMonitor on Kafka, alerts and retraining requests out.

Owns the Kafka loop around `monitor.DriftMonitor`, the retraining policy, the JSON state file, Prometheus metrics.

The loop reads settings.topic_predictions and settings.topic_labels (every partition,
assigned: the monitor is one stateful process, no group join to wait for), feeds the
library, publishes each DriftAlert to settings.topic_drift and, when `RetrainPolicy` says
so, a RetrainRequest to settings.topic_retrain. The stream engine's dead-letter rate (records
on settings.topic_deadletter over records on the event topics, both counted from the end
of the topics at start-up, not decoded) is fed to the library as a data-quality input.
Counted, not taken from broker watermarks: the embedded broker (Tansu) reports the end
offset of a topic as its last batch's base offset + 1, not its last record's.

Restart. The state file (`<data_dir>/monitor/state.json`, plain JSON) holds the library's
`state_dict()`, the policy's clocks and the next offset of every partition, written
together after the alerts before them were delivered (acknowledged by the broker; what
failed is sent again first), and only by a loop that was not stopped by an error in the
middle of a batch: a kill or crash anywhere loses no alert. A restart resumes exactly there,
with warmed-up detectors and running cooldowns, so it raises nothing the stream did not
cause. After a crash the records since the last snapshot are read again; alert and request
ids are deterministic, so what is published twice carries the same ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import tomllib
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from freshet.challengers import EVIDENCE_TAG, ROLLED_BACK
from freshet.contracts import DRIFT_KINDS, ContractError, DriftAlert, Label, Prediction, RetrainRequest
from freshet.crashpoints import CrashPoints
from freshet.features import FeatureRegistry
from freshet.exporter import MetricsEndpoint
from freshet.settings import DEFAULT_FEATURE_SERVICE, DEFAULT_MODEL_NAME, Settings
from freshet.times import iso_utc

from .challengers import COMPARISON_DETECTORS, Evidence, RollbackDecision

log = logging.getLogger("freshet.monitor.service")

STATE_FORMAT = "freshet.monitor.service/1"
DEFAULT_REQUEST_FIELDS = ("amount",)
# FRESHET_MONITOR_TEST_CRASH_AT's points (freshet.crashpoints), a test hook never set in production.
CRASH_POINTS = {
    "delivered": "a save's alerts or retrain requests are acknowledged by the broker, the state that covers "
                 "them not yet saved",
}


class MonitorSetupError(ValueError):
    """The monitor cannot start as configured; the message names the setting and the fix."""


# ---------------------------------------------------------------------------
# the retraining policy
# ---------------------------------------------------------------------------

@dataclass
class RetrainPolicy:
    """Turns drift alerts into retraining requests: which kinds, how many, how often.

    A request goes out once `min_alerts` alerts of `kinds` for a model fall within
    `window_s` seconds, and at most one per `cooldown_s` seconds per model; it cites every
    such alert. Alerts that arrive during a cooldown wait for its end (`due`) rather than
    for another alert. Time is the alerts' own `ts` and the predictions' `ts`, so a replay
    decides as the first run did.

    >>> policy = RetrainPolicy(min_alerts=2, window_s=60, cooldown_s=600)
    >>> def alert(i, ts, kind="feature"):
    ...     return DriftAlert(f"a{i}", "fraud", "1", kind, "amount", "adwin", 3.0, 2.0, 100, ts)
    >>> policy.observe(alert(1, 0.0)) is None      # one alert is not enough
    True
    >>> policy.observe(alert(2, 5.0, "data_quality")) is None  # not a kind that retrains
    True
    >>> policy.observe(alert(3, 30.0)).reason
    ['a1', 'a3']
    >>> policy.observe(alert(4, 40.0)) is None     # cooling down
    True
    >>> policy = RetrainPolicy(cooldown_s=60)
    >>> policy.observe(alert(5, 100.0)).reason
    ['a5']
    >>> policy.observe(alert(6, 130.0)) is None    # cooling down until 160
    True
    >>> policy.due(150.0)
    []
    >>> [r.reason for r in policy.due(160.0)]      # over: a request for what came during it
    [['a6']]
    """

    kinds: Sequence[str] = ("feature", "prediction", "performance")
    min_alerts: int = 1
    window_s: float = 600.0
    cooldown_s: float = 900.0
    _pending: dict[str, list[tuple[float, str]]] = field(default_factory=dict, repr=False)
    _last: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        unknown = [k for k in self.kinds if k not in DRIFT_KINDS]
        if unknown:
            raise MonitorSetupError(f"retrain policy: unknown alert kind(s) {', '.join(map(repr, unknown))}; "
                                    f"known: {', '.join(DRIFT_KINDS)}")
        if int(self.min_alerts) < 1:
            raise MonitorSetupError(f"retrain policy: min_alerts must be >= 1, got {self.min_alerts}")
        if not self.window_s > 0:
            raise MonitorSetupError(f"retrain policy: window_s must be > 0, got {self.window_s}")
        if self.cooldown_s < 0:
            raise MonitorSetupError(f"retrain policy: cooldown_s must be >= 0, got {self.cooldown_s}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RetrainPolicy":
        known = {"kinds", "min_alerts", "window_s", "cooldown_s"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MonitorSetupError(f"retrain policy: unknown setting(s) {', '.join(map(repr, unknown))}; "
                                    f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def observe(self, alert: DriftAlert) -> RetrainRequest | None:
        """The request this alert completes, if any. Comparisons between versions (a challenger's
        verdict, a rollback) are not drift: they never ask for retraining."""
        if alert.kind not in self.kinds or alert.detector in COMPARISON_DETECTORS:
            return None
        ts = float(alert.ts)
        pending = self._within_window(alert.model, ts)
        if all(a != alert.alert_id for _, a in pending):
            pending.append((ts, alert.alert_id))
        return self._request(alert.model, ts)

    def due(self, now: float) -> list[RetrainRequest]:
        """Requests whose alerts arrived during a cooldown that is over at `now`.

        Without this, alerts raised while a model cools down (often the burst right after a
        real drift, when an earlier request was still recent) would wait for yet another
        alert. `now` is stream time (the newest prediction's `ts`), so a replay decides alike.
        """
        out = []
        for model in list(self._pending):
            self._within_window(model, now)
            request = self._request(model, now)
            if request is not None:
                out.append(request)
        return out

    def _within_window(self, model: str, ts: float) -> list[tuple[float, str]]:
        """The model's pending alerts, those older than `window_s` before `ts` dropped."""
        pending = self._pending[model] = [(t, a) for t, a in self._pending.get(model, []) if t > ts - self.window_s]
        return pending

    def _request(self, model: str, ts: float) -> RetrainRequest | None:
        pending = self._pending.get(model, [])
        last = self._last.get(model)
        if len(pending) < self.min_alerts or (last is not None and ts - last < self.cooldown_s):
            return None
        reason = [a for _, a in pending]
        self._pending[model] = []
        self._last[model] = ts
        digest = hashlib.blake2b(f"{model}|{'|'.join(reason)}".encode(), digest_size=16).hexdigest()
        return RetrainRequest(request_id=digest, model=model, reason=reason, ts=ts)

    def state_dict(self) -> dict[str, Any]:
        return {"pending": {m: [list(p) for p in v] for m, v in self._pending.items()}, "last": dict(self._last)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self._pending = {m: [(float(t), str(a)) for t, a in v] for m, v in state.get("pending", {}).items()}
        self._last = {m: float(t) for m, t in state.get("last", {}).items()}


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

def known_inputs(registry: FeatureRegistry) -> set[str]:
    """Names a prediction's `features` may carry: every "view:feature" and every event field
    (request-time inputs such as `amount` come from the same source)."""
    names = {f"{v.name}:{f}" for v in registry.views.values() for f in v.feature_names}
    for v in registry.views.values():
        names.update(c for c in v.source_schema if c != v.timestamp_field)
    return names


def default_config(registry: FeatureRegistry, model: str = DEFAULT_MODEL_NAME, service: str = DEFAULT_FEATURE_SERVICE,
                   request_fields: Sequence[str] = DEFAULT_REQUEST_FIELDS,
                   max_window_s: int | None = 3600) -> dict[str, Any]:
    """Watch the model's feature service (features over windows up to `max_window_s`) and its
    request-time fields.

    Why a window limit: a feature over a window longer than the stream has run keeps growing
    until the window is full (a day's count on a stream started an hour ago), which a drift
    detector rightly calls drift. None watches every window.
    """
    if service not in registry.feature_services:
        raise MonitorSetupError(f"feature service {service!r} is not in the registry (known: "
                                f"{', '.join(registry.feature_services) or 'none'}); pass --config naming the "
                                "features to watch")
    windows = {f"{v.name}:{a.name}": a.window_s for v in registry.views.values() for a in v.aggregations}
    refs = [r for r in registry.feature_services[service]
            if max_window_s is None or windows.get(r, 0) <= max_window_s]
    # windows: a feature is not judged until its window is full (unless a training reference says it was)
    return {"models": [{"model": model, "numeric_features": [*refs, *request_fields],
                        "windows": {r: windows[r] for r in refs if r in windows}}]}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A monitor config from TOML or JSON: MonitorConfig fields plus an optional [policy] table."""
    p = Path(path)
    if not p.is_file():
        raise MonitorSetupError(f"monitor config {p} does not exist")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise MonitorSetupError(f"monitor config {p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'}: "
                                f"{exc}") from None


def build(config: Mapping[str, Any], known_features: Iterable[str] | None,
          references: Callable[[str, str], Mapping[str, Any] | None] | None = None):
    """(DriftMonitor, RetrainPolicy) from a config dict; unknown features, detectors or settings fail here.

    `references` gives each version's training reference (`monitor.references.RegistryReferences`)."""
    from freshet.monitor import ConfigError, DriftMonitor

    config = dict(config)
    policy = RetrainPolicy.from_dict(config.pop("policy", {}) or {})
    try:
        monitor = DriftMonitor(config, known_features=known_features, references=references)
    except (ConfigError, TypeError) as exc:
        raise MonitorSetupError(str(exc)) from None
    if not monitor.models:
        raise MonitorSetupError("the monitor config names no model to watch; add a [[models]] table")
    return monitor, policy


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------

class MonitorMetrics(MetricsEndpoint):
    """Prometheus metrics of one monitor process, in their own registry."""

    def __init__(self):
        from prometheus_client import Counter as PCounter, Gauge

        super().__init__()
        r = self.registry
        self.records = PCounter("freshet_monitor_records", "Records read, by topic and outcome",
                                ["topic", "outcome"], registry=r)
        self.alerts = PCounter("freshet_monitor_alerts", "Drift alerts published", ["model", "kind", "subject"],
                               registry=r)
        self.requests = PCounter("freshet_monitor_retrain_requests", "Retraining requests published", ["model"],
                                 registry=r)
        self.statistic = Gauge("freshet_monitor_detector_statistic",
                               "Current detector statistics (shift in reference sd per stream, error rates)",
                               ["model", "statistic"], registry=r)
        self.warming = Gauge("freshet_monitor_warming_up", "Parts of a model's monitor still warming up",
                             ["model"], registry=r)
        self.observed = Gauge("freshet_monitor_observed", "Predictions and labelled outcomes seen per model",
                              ["model", "what"], registry=r)
        self.labels = Gauge("freshet_monitor_label_join", "Label join counters", ["what"], registry=r)
        self.deadletter = Gauge("freshet_monitor_deadletter_rate", "Share of stream events dead-lettered, "
                                "last interval", registry=r)
        self.lag = Gauge("freshet_monitor_snapshot_age_seconds", "Seconds since the state was last saved",
                         registry=r)
        self.version_error_rate = Gauge("freshet_monitor_version_error_rate",
                                        "Labelled error rate per version and role (champion, shadow, canary)",
                                        ["model", "version", "role"], registry=r)
        self.version_outcomes = Gauge("freshet_monitor_version_outcomes", "Labelled outcomes per version and role",
                                      ["model", "version", "role"], registry=r)
        self.challenger_difference = Gauge(
            "freshet_monitor_challenger_error_difference",
            "A shadow's or canary's error rate minus the champion's on its basis (shadow: the same requests)",
            ["model", "role", "version", "bound"], registry=r)
        self.rollbacks = PCounter("freshet_monitor_rollbacks", "Champions rolled back (or, with "
                                  "FRESHET_ROLLBACK_AUTO=off, found worse than their predecessor)",
                                  ["model", "version", "outcome"], registry=r)
        self.warming_until = Gauge("freshet_monitor_warming_until_seconds",
                                   "Windowed features not judged until their window is full: until when "
                                   "(epoch seconds, prediction time)", ["model", "feature"], registry=r)
        self._warming_shown: set[tuple[str, str]] = set()

    def _show_warming(self, model: str, until: Mapping[str, float]) -> None:
        for feature, ts in until.items():
            self.warming_until.labels(model, feature).set(ts)
            self._warming_shown.add((model, feature))
        for key in [k for k in self._warming_shown if k[0] == model and k[1] not in until]:
            self.warming_until.remove(*key)
            self._warming_shown.discard(key)

    def update(self, monitor: Any) -> None:
        for model, stats in monitor.statistics().items():
            for name, value in stats.items():
                if value is not None and math.isfinite(value):
                    self.statistic.labels(model, name).set(value)
        counters = monitor.counters()
        for model, c in counters["models"].items():
            self.warming.labels(model).set(len(c.get("warming_up", [])))
            self.observed.labels(model, "predictions").set(c.get("predictions", 0))
            self.observed.labels(model, "outcomes").set(c.get("outcomes", 0))
            self._show_warming(model, c.get("warming_until", {}))
        for name, value in counters.get("labels", {}).items():
            if isinstance(value, (int, float)):
                self.labels.labels(name).set(value)
        online = monitor.online.report()
        for v in online["versions"]:
            self.version_outcomes.labels(v["model"], v["version"], v["role"]).set(v["n"])
            if v["n"]:
                self.version_error_rate.labels(v["model"], v["version"], v["role"]).set(v["error_rate"])
        for c in online["challengers"]:
            for bound in ("difference", "low", "high"):
                self.challenger_difference.labels(c["model"], c["role"], c["version"], bound).set(c[bound])


# ---------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------

def state_path(settings: Settings) -> Path:
    return settings.data_path / "monitor" / "state.json"


class MonitorService:
    """The Kafka loop: records in, alerts and requests out, state saved with the offsets it covers."""

    def __init__(self, settings: Settings, monitor: Any, policy: RetrainPolicy, *,
                 event_topics: Sequence[str] = (), state_file: Path | None = None, snapshot_every_s: float = 30.0,
                 start: str = "earliest", metrics: MonitorMetrics | None = None,
                 deadletter_every_s: float = 10.0, deadletter_min_events: int = 500, idle_flush_s: float = 1.0,
                 on_alert: Callable[[DriftAlert], None] | None = None,
                 on_request: Callable[[RetrainRequest], None] | None = None,
                 rollback: "ChampionRollback | None" = None,
                 evidence: "EvidenceRecorder | None" = None):
        if start not in ("earliest", "latest"):
            raise MonitorSetupError(f"start must be 'earliest' or 'latest', got {start!r}")
        self.settings = settings
        self.monitor = monitor
        self.policy = policy
        self.event_topics = list(event_topics)
        self.state_file = state_file or state_path(settings)
        self.snapshot_every_s = snapshot_every_s
        self.start = start
        self.metrics = metrics
        self.deadletter_every_s = deadletter_every_s
        self.deadletter_min_events = deadletter_min_events
        self.idle_flush_s = idle_flush_s
        self.on_alert = on_alert
        self.on_request = on_request
        self.rollback = rollback
        self.evidence = evidence
        self.topics = [settings.topic_predictions, settings.topic_labels]
        self.offsets: dict[str, dict[int, int]] = {}
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.restored = False
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self._consumer = None
        self._producer = None
        self._dl_looks: deque[tuple[int, int]] = deque(maxlen=10_000)  # (events, dead letters) per look
        self._seen_events = self._seen_dead = 0
        self._counted = set(self.event_topics) | ({settings.topic_deadletter} if self.event_topics else set())
        self._dirty = False  # observations since the last flush
        # alerts and requests produced since the last save: sent again if any failed delivery
        self._outbox: list[tuple[str, bytes, bytes]] = []
        self._undelivered = 0
        self._stream_ts: float | None = None  # newest prediction time: the policy's clock for due requests
        self._last_snapshot = time.monotonic()
        self.crash = CrashPoints(settings.monitor_test_crash_at, CRASH_POINTS, "FRESHET_MONITOR_TEST_CRASH_AT")

    def stop(self) -> None:
        self.stop_event.set()

    # -- state --------------------------------------------------------------------------

    def restore(self) -> bool:
        """Load the state file if there is one; True if it was used."""
        if not self.state_file.is_file():
            return False
        try:
            state = json.loads(self.state_file.read_text())
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"format {state.get('format')!r} is not {STATE_FORMAT!r}")
            fresh = self.monitor.load_state(state["monitor"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MonitorSetupError(f"monitor state {self.state_file} cannot be used ({exc}); move it away to "
                                    "start the monitor afresh (it warms up again)") from None
        self.policy.load_state(state.get("policy", {}))
        self.offsets = {t: {int(p): int(o) for p, o in parts.items()} for t, parts in state.get("offsets", {}).items()}
        self.counts.update(state.get("counts", {}))
        self.restored = True
        log.info("restored monitor state from %s (saved %s); %s", self.state_file,
                 time.strftime("%H:%M:%S", time.localtime(state.get("saved_at", 0))),
                 "warming up afresh: " + json.dumps(fresh) if fresh else "no part warms up again")
        return True

    def snapshot(self) -> bool:
        """Flush the library, deliver what is queued, then save state and offsets together."""
        self._publish(self.monitor.flush())
        self._dirty = False
        sent = len(self._outbox)
        if not self._deliver_outbox():
            log.warning("alerts not delivered; state not saved (a restart replays from the last save)")
            return False
        if sent:
            self.crash.reached("delivered")
        state = {"format": STATE_FORMAT, "saved_at": time.time(), "monitor": self.monitor.state_dict(),
                 "policy": self.policy.state_dict(),
                 "offsets": {t: {str(p): o for p, o in parts.items()} for t, parts in self.offsets.items()},
                 "counts": dict(self.counts)}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_name(f".{self.state_file.name}.tmp")
        tmp.write_bytes(_dumps(state))
        os.replace(tmp, self.state_file)
        self._last_snapshot = time.monotonic()
        if self._consumer is not None:
            self._commit()
        return True

    def _deliver_outbox(self, attempts: int = 3) -> bool:
        """Every alert and request produced since the last save acknowledged; what failed is sent again."""
        if self._producer is None:
            return True
        for attempt in range(attempts):
            if self._producer.flush(15) == 0 and self._undelivered == 0:
                self._outbox.clear()
                return True
            log.warning("%d alert/request message(s) not delivered; sending the %d since the last save again "
                        "(attempt %d; their ids make repeats harmless)", self._undelivered, len(self._outbox),
                        attempt + 1)
            self._undelivered = 0
            for topic, key, value in self._outbox:
                self._produce(topic, key, value)
        return False

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._undelivered += 1

    def _send(self, topic: str, key: bytes, value: bytes) -> None:
        self._outbox.append((topic, key, value))
        self._produce(topic, key, value)

    def _produce(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, key=key, value=value)
                return
            except BufferError:  # the local queue is full: wait for deliveries instead of dropping an alert
                self._producer.poll(0.5)

    def _commit(self) -> None:
        # informational (consumer-lag tools); the state file is what a restart reads
        from confluent_kafka import TopicPartition

        parts = [TopicPartition(t, p, o) for t, ps in self.offsets.items() for p, o in ps.items()]
        if parts:
            try:
                self._consumer.commit(offsets=parts, asynchronous=True)
            except Exception as exc:  # noqa: BLE001 - lag reporting only
                log.debug("offset commit failed: %s", exc)

    # -- Kafka ----------------------------------------------------------------------------

    def _open(self, group: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        from freshet import kafka

        s = self.settings
        kafka.ensure_topics(s, [*self.topics, s.topic_drift, s.topic_retrain, *sorted(self._counted)])
        self._consumer = kafka.consumer(s, group)
        self._producer = kafka.producer(s, **{"linger.ms": 20, "on_delivery": self._on_delivery})
        assignment = []
        for topic in self.topics:
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            saved = self.offsets.setdefault(topic, {})
            for p in sorted(meta.partitions):
                if p in saved:
                    offset = saved[p]
                else:
                    offset = OFFSET_BEGINNING if self.start == "earliest" else OFFSET_END
                assignment.append(TopicPartition(topic, p, offset))
        for topic in sorted(self._counted):  # only counted, from now on
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            assignment += [TopicPartition(topic, p, OFFSET_END) for p in sorted(meta.partitions)]
        self._consumer.assign(assignment)
        log.info("monitor reads %s from %s; alerts to %s, retrain requests to %s",
                 " and ".join(self.topics), "the saved offsets" if self.restored else f"the {self.start} offsets",
                 s.topic_drift, s.topic_retrain)

    def _publish(self, alerts: list[DriftAlert]) -> None:
        s = self.settings
        for alert in alerts:
            self.counts["alerts"] += 1
            log.warning("drift alert %s: model %s v%s %s %r (%s statistic %.4g, threshold %.4g, over %s)", alert.alert_id,
                        alert.model, alert.model_version, alert.kind, alert.subject, alert.detector,
                        alert.statistic, alert.threshold, alert.window)
            if self._producer is not None:
                self._send(s.topic_drift, alert.key(), alert.encode())
            if self.metrics:
                self.metrics.alerts.labels(alert.model, alert.kind, alert.subject).inc()
            if self.on_alert:
                self.on_alert(alert)
            request = self.policy.observe(alert)
            if request is not None:
                self._request_retrain(request)
        if self._stream_ts is not None:
            for request in self.policy.due(self._stream_ts):
                self._request_retrain(request)
        for decision in self.monitor.online.take_rollbacks():
            self._roll_back(decision)
        for evidence in self.monitor.online.take_evidence():
            if self.evidence is not None:
                self.evidence(evidence)

    def _roll_back(self, decision: RollbackDecision) -> None:
        """Carry out a rollback the comparison decided, after its alert was queued."""
        c = decision.comparison
        outcome = "off"
        if self.rollback is not None:
            outcome = self.rollback(decision)
        log.warning("champion %s v%s: error rate %.2f%% (n=%d) vs v%s's %.2f%% (n=%d), z=%.2f: %s", decision.model,
                    decision.version, 100 * c.new_rate, c.new_n, decision.predecessor, 100 * c.old_rate, c.old_n, c.z,
                    {"rolled_back": f"rolled back to v{decision.predecessor}",
                     "off": "not rolled back (FRESHET_ROLLBACK_AUTO=off)"}.get(outcome, outcome))
        self.counts[f"rollbacks_{outcome if outcome in ('rolled_back', 'off') else 'skipped'}"] += 1
        if self.metrics:
            self.metrics.rollbacks.labels(decision.model, decision.version,
                                          outcome if outcome in ("rolled_back", "off") else "skipped").inc()

    def _request_retrain(self, request: RetrainRequest) -> None:
        self.counts["retrain_requests"] += 1
        log.warning("retrain request %s for model %s: %d alert(s) %s", request.request_id, request.model,
                    len(request.reason), ", ".join(request.reason[:5]))
        if self._producer is not None:
            self._send(self.settings.topic_retrain, request.key(), request.encode())
        if self.metrics:
            self.metrics.requests.labels(request.model).inc()
        if self.on_request:
            self.on_request(request)

    def process(self, messages: Iterable[Any]) -> list[DriftAlert]:
        """Feed a poll's messages to the library; returns (and publishes) the alerts they complete."""
        preds, labels = self.settings.topic_predictions, self.settings.topic_labels
        alerts: list[DriftAlert] = []
        for msg in messages:
            if msg.error() is not None:
                log.warning("monitor: %s", msg.error())
                continue
            topic, partition = msg.topic(), msg.partition()
            if topic in self._counted:
                if topic == self.settings.topic_deadletter:
                    self._seen_dead += 1
                else:
                    self._seen_events += 1
                continue
            try:
                if topic == preds:
                    record = Prediction.decode(msg.value())
                    alerts += self.monitor.observe(record)
                    self._stream_ts = max(self._stream_ts or record.ts, record.ts)
                elif topic == labels:
                    alerts += self.monitor.observe_label(Label.decode(msg.value()))
                else:
                    continue
            except (ContractError, TypeError, ValueError) as exc:
                self._reject(topic, partition, msg.offset(), exc)
                self.offsets.setdefault(topic, {})[partition] = msg.offset() + 1
                continue
            # advanced once observed: a state saved with this offset holds the record's effect
            self.offsets.setdefault(topic, {})[partition] = msg.offset() + 1
            self.counts[topic] += 1
            self._dirty = True
            if self.metrics:
                self.metrics.records.labels(topic, "observed").inc()
        self._publish(alerts)
        return alerts

    def _reject(self, topic: str, partition: int, offset: int, exc: Exception) -> None:
        reason = str(exc).split(":")[0][:80]
        key = reason if reason in self.rejected or len(self.rejected) < 100 else "<other>"
        self.rejected[key] += 1
        self.counts["rejected"] += 1
        n = self.counts["rejected"]
        if n <= 10 or n % 1000 == 0:
            log.warning("monitor: record %s[%d]@%d breaks its contract (%s); %d rejected so far",
                        topic, partition, offset, exc, n)
        if self.metrics:
            self.metrics.records.labels(topic, "rejected").inc()

    def _deadletter_rate(self) -> None:
        """Dead letters over events across the last `deadletter_min_events` events counted.

        A sliding window of looks, not consecutive intervals: the stream dead-letters an event
        after it was published, so an interval's dead letters may be counted in the next look.
        """
        if not self.event_topics:
            return
        events, dead = self._seen_events, self._seen_dead
        looks = self._dl_looks
        looks.append((events, dead))
        base = None
        while looks and events - looks[0][0] >= self.deadletter_min_events:
            base = looks.popleft()  # the newest look still far enough back
        if base is None:
            return
        looks.appendleft(base)
        d_events, d_dead = events - base[0], dead - base[1]
        rate = max(0.0, d_dead) / d_events
        if self.metrics:
            self.metrics.deadletter.set(rate)
        self._publish(self.monitor.observe_deadletter_rate(rate, None, time.time(), d_events))

    def run(self, group: str = "freshet-monitor") -> None:
        """Until `stop()`: poll, observe, publish; snapshot every `snapshot_every_s` and at the end."""
        self._open(group)
        self._last_snapshot = time.monotonic()
        next_dl = next_metrics = time.monotonic()
        idle_since = time.monotonic()
        self.ready.set()
        clean = False
        try:
            while not self.stop_event.is_set():
                msgs = self._consumer.consume(1000, 0.2)
                now = time.monotonic()
                if msgs:
                    self.process(msgs)
                    idle_since = now
                elif self._dirty and now - idle_since >= self.idle_flush_s:
                    # an idle stream: judge the partly filled blocks so alerts do not wait for traffic
                    self._publish(self.monitor.flush())
                    self._dirty = False
                if now >= next_dl:
                    self._deadletter_rate()
                    next_dl = now + self.deadletter_every_s
                if self.metrics and now >= next_metrics:
                    self.metrics.update(self.monitor)
                    self.metrics.lag.set(now - self._last_snapshot)
                    next_metrics = now + 2.0
                if now - self._last_snapshot >= self.snapshot_every_s:
                    self.snapshot()
                self._producer.poll(0)
            clean = True
        finally:
            try:
                # stopped by an error mid-batch, the library may hold alerts never published: no save
                if not clean:
                    log.error("monitor stopped by an error; state not saved (a restart replays from %s)",
                              self.state_file)
                elif self.snapshot():
                    log.info("monitor stopped; state saved to %s (%s)", self.state_file, dict(self.counts))
            finally:
                self._consumer.close()
                self._consumer = None
                self._producer = None


class ChampionRollback:
    """Moves a model's champion alias back to its predecessor through the model registry (which publishes
    the `champion` event servers follow), then announces a `rolled_back` event for the demoted version.

    Only while the demoted version is still the champion: a promotion made since is left alone."""

    def __init__(self, settings: Settings, registry: Any = None):
        self.settings = settings
        self._registry = registry

    @property
    def registry(self):
        if self._registry is None:
            from freshet.models import ModelRegistry

            self._registry = ModelRegistry(self.settings, publish_events=True)
        return self._registry

    def __call__(self, decision: RollbackDecision) -> str:
        """"rolled_back", or why not."""
        from freshet.models import ModelNotFound

        c = decision.comparison
        try:
            event = self.registry.rollback(decision.model, expected_current=decision.version)
        except ModelNotFound as exc:
            return f"not rolled back: {exc}"
        except Exception as exc:  # noqa: BLE001 - the registry is down: the alert stands, an operator acts
            return f"not rolled back: the model registry failed: {exc}"
        if event.version != decision.predecessor:
            log.warning("rolled %s back to v%s, the version promoted before v%s (the prediction log had v%s "
                        "before it)", decision.model, event.version, decision.version, decision.predecessor)
        self.registry.announce(decision.model, decision.version, ROLLED_BACK, {
            "error_rate": c.new_rate, "outcomes": c.new_n, "predecessor": float(decision.predecessor),
            "predecessor_error_rate": c.old_rate, "predecessor_outcomes": c.old_n, "z": c.z, "p_value": c.p_value})
        return "rolled_back"


class EvidenceRecorder:
    """Writes each challenger's latest online comparison on its version in the model registry (EVIDENCE_TAG),
    where `freshet models show` prints it and `freshet models promote --online-evidence` requires it."""

    def __init__(self, settings: Settings, registry: Any = None):
        self.settings = settings
        self._registry = registry

    def __call__(self, evidence: Evidence) -> bool:
        try:
            if self._registry is None:
                from freshet.models import ModelRegistry

                self._registry = ModelRegistry(self.settings, publish_events=False)
            self._registry.client.set_model_version_tag(evidence.model, evidence.version, EVIDENCE_TAG,
                                                        json.dumps(evidence.as_tag(time.time())))
            return True
        except Exception as exc:  # noqa: BLE001 - the comparison stands on /metrics; the next look writes again
            log.warning("could not record the online evidence of %s v%s: %s", evidence.model, evidence.version, exc)
            return False


def _dumps(obj: Any) -> bytes:
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


# ---------------------------------------------------------------------------
# freshet alerts
# ---------------------------------------------------------------------------

def format_alert(alert: DriftAlert) -> str:
    """One line per alert, for people.

    >>> print(format_alert(DriftAlert("ab12", "fraud", "2", "feature", "amount", "adwin", 3.2, 2.5, 64, 0.0)))
    1970-01-01T00:00:00Z fraud v2 feature amount: adwin statistic 3.2 (threshold 2.5) over 64 (alert ab12)
    """
    when = iso_utc(alert.ts)
    window = json.dumps(alert.window) if isinstance(alert.window, dict) else alert.window
    return (f"{when} {alert.model} v{alert.model_version or '?'} {alert.kind} {alert.subject}: {alert.detector} "
            f"statistic {alert.statistic:.4g} (threshold {alert.threshold:.4g}) over {window} (alert {alert.alert_id})")


def read_alerts(settings: Settings, follow: bool = False, model: str | None = None,
                stop: threading.Event | None = None, idle_timeout_s: float = 10.0) -> Iterable[DriftAlert | str]:
    """Alerts on settings.topic_drift from the beginning; with `follow`, then new ones as they come.

    Yields DriftAlert, or a str describing a record that is not one (for the caller to warn about).
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from freshet import kafka

    topic = settings.topic_drift
    kafka.ensure_topics(settings, [topic])
    consumer = kafka.consumer(settings, f"freshet-alerts-{os.getpid()}", **{"enable.partition.eof": True})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        open_parts = set(meta.partitions)
        last_seen = time.monotonic()
        while not (stop and stop.is_set()):
            if not follow and not open_parts:
                return
            msg = consumer.poll(0.2)
            if msg is None:
                if not follow and time.monotonic() - last_seen > idle_timeout_s:
                    return
                continue
            last_seen = time.monotonic()
            if msg.error() is not None:
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(msg.partition())
                continue
            try:
                alert = DriftAlert.decode(msg.value())
            except ContractError as exc:
                yield f"{topic}[{msg.partition()}]@{msg.offset()} is not a drift alert: {exc}"
                continue
            if model is None or alert.model == model:
                yield alert
    finally:
        consumer.close()
