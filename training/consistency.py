"""`freshet consistency`: served predictions sampled, their features recomputed from the raw log, judged.

Owns `ServedConsistency` (sample, wait for the raw log, recompute with the training sets'
definition, judge) and `ConsistencyService` (the Kafka loop: freshet.predictions in, a
Prometheus rate per feature and `data_quality` alerts on freshet.drift out).

It lives with training, not in the monitor, because the recomputation is the training set's
own definition (`freshet.stream.pointintime`): a consistent feature is one a model is trained
on exactly as it is served. The rate and the alert rule are the monitor's
(`freshet.monitor.consistency`). A prediction is judged once the raw log must hold every event
the stream had accepted by its time (`settle_s` later: the stream flushes the raw log at every
offset commit); events accepted within the grace before it, and a slide boundary passed within
it, may not have reached Redis yet and are allowed for (FRESHET_CONSISTENCY_GRACE_MS).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from freshet.contracts import ContractError, DriftAlert, Prediction
from freshet.features import FeatureRegistry
from freshet.monitor.consistency import ConsistencyMetrics, ConsistencyRate
from freshet.offline_store import Location, OfflineStore, as_location, read_table
from freshet.settings import Settings
from freshet.stream.pointintime import ServedFeatures, judge

log = logging.getLogger("freshet.consistency")

MAX_MISMATCHES = 1000  # kept for reports (the counts cover every one)
FORGET_EVERY_S = 10.0  # how often events no pending request can reach are dropped


def sampled(request_id: str, share: float) -> bool:
    """Whether a request is in the sample: by a hash of its id, so every run picks the same ones.

    >>> sampled("tx1", 1.0), sampled("tx1", 0.0)
    (True, False)
    """
    if share >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < share


class RawLogFollower:
    """Reads the raw log's part files as they appear (each part once: they are immutable)."""

    def __init__(self, root: Location | Path):
        self.root = as_location(root)
        self.read_files: set[Location] = set()

    def new_rows(self) -> pd.DataFrame | None:
        new = [p for p in self.root.parts() if p not in self.read_files]
        if not new:
            return None
        frames = []
        for part in new:
            frames.append(read_table([part]).to_pandas())
            self.read_files.add(part)
        return pd.concat(frames, ignore_index=True)


class ServedConsistency:
    """Sampled predictions judged against the features recomputed as served at their time."""

    def __init__(self, settings: Settings, registry: FeatureRegistry, rate: ConsistencyRate | None = None,
                 sample: float | None = None, grace_s: float | None = None, settle_s: float | None = None,
                 on_verdict: Callable[[str, bool], None] | None = None):
        self.settings = settings
        self.registry = registry
        self.rate = rate or ConsistencyRate(min_rate=settings.consistency_min_rate)
        self.sample = settings.consistency_sample if sample is None else sample
        self.grace_s = settings.consistency_grace_ms / 1000.0 if grace_s is None else grace_s
        # the raw log is flushed before every offset commit: after a commit interval (plus the grace
        # for a slow batch) every event accepted before a request is on disk
        self.settle_s = (settings.stream_commit_interval_ms / 1000.0 + self.grace_s + 1.0
                         if settle_s is None else settle_s)
        self.on_verdict = on_verdict
        self.views = {name: ServedFeatures(view, settings.stream_clock_ahead_s) for name, view in registry.views.items()}
        self.followers = {topic: RawLogFollower(OfflineStore.of(settings).raw(topic))
                          for topic in registry.views_by_topic()}
        self.pending: deque[Prediction] = deque()
        self.mismatches: deque[dict[str, Any]] = deque(maxlen=MAX_MISMATCHES)
        self.judged = 0
        self.skipped = 0  # sampled predictions naming no feature of the registry
        self.latest: dict[str, str] = {}  # model -> newest version judged
        self._forgot_at = time.monotonic()

    def offer(self, prediction: Prediction) -> bool:
        """Queue a served prediction if it is in the sample; True if it was."""
        if not sampled(prediction.request_id, self.sample):
            return False
        self.pending.append(prediction)
        return True

    def judge_due(self, now: float | None = None) -> int:
        """Judge every queued prediction whose raw log is complete by `now` (wall clock); returns how many."""
        now = time.time() if now is None else now
        due = []
        while self.pending and float(self.pending[0].ts) + self.settle_s <= now:
            due.append(self.pending.popleft())
        if not due:
            return 0
        self.read_raw_log()
        for prediction in due:
            self.judge(prediction)
        if time.monotonic() - self._forgot_at >= FORGET_EVERY_S:
            self._forgot_at = time.monotonic()
            oldest = float(self.pending[0].ts) if self.pending else now
            for served in self.views.values():  # the stream's clock then: event time, maybe simulated
                served.forget(served.clock.at(min(oldest, now) - self.grace_s - self.settle_s))
        return len(due)

    def read_raw_log(self) -> None:
        """Take the raw log's part files written since the last look."""
        for topic, follower in self.followers.items():
            rows = follower.new_rows()
            if rows is not None and len(rows):
                for view in self.registry.views_by_topic()[topic]:
                    self.views[view.name].add(rows)

    def judge(self, prediction: Prediction) -> dict[str, bool]:
        """Each feature of the prediction: served value equal to its recomputation? (also counted)"""
        verdicts: dict[str, bool] = {}
        ts = float(prediction.ts)
        for name, served in self.views.items():
            view = served.view
            refs = [f"{name}:{f}" for f in view.feature_names if f"{name}:{f}" in prediction.features]
            if not refs:
                continue
            try:
                key = tuple(prediction.entities[k] for k in view.join_keys)
            except KeyError:
                continue
            candidates = served.candidates(key, ts, self.grace_s)
            given = {ref.partition(":")[2]: prediction.features[ref] for ref in refs}
            verdict = judge(given, candidates, list(given))
            for feature, ok in verdict.items():
                ref = f"{name}:{feature}"
                verdicts[ref] = ok
                self.rate.observe(ref, ok)
                if self.on_verdict is not None:
                    self.on_verdict(ref, ok)
                if not ok:
                    self.mismatches.append({"request_id": prediction.request_id, "feature": ref,
                                            "entity": list(key), "served": given[feature],
                                            "recomputed": candidates[0].get(feature), "request_ts": ts})
        if verdicts:
            self.judged += 1
            self.latest[prediction.model] = str(prediction.model_version)
        else:
            self.skipped += 1
        return verdicts


class ConsistencyService:
    """The Kafka loop: predictions in, judged after they settle, alerts and metrics out."""

    def __init__(self, settings: Settings, checker: ServedConsistency, metrics: ConsistencyMetrics | None = None,
                 start: str = "latest", on_alert: Callable[[DriftAlert], None] | None = None,
                 summary_file: Path | None = None):
        self.settings = settings
        self.checker = checker
        self.metrics = metrics
        self.start = start
        self.on_alert = on_alert
        self.summary_file = summary_file
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.alerts_published = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, group: str = "freshet-consistency") -> None:
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        from freshet import kafka

        s = self.settings
        kafka.ensure_topics(s, [s.topic_predictions, s.topic_drift])
        consumer = kafka.consumer(s, group)
        producer = kafka.producer(s, **{"linger.ms": 20})
        meta = consumer.list_topics(s.topic_predictions, timeout=10).topics[s.topic_predictions]
        offset = OFFSET_BEGINNING if self.start == "earliest" else OFFSET_END
        consumer.assign([TopicPartition(s.topic_predictions, p, offset) for p in sorted(meta.partitions)])
        log.info("consistency check reads %s (%s), samples %.0f%%, judges %.1fs after each request (grace %.1fs); "
                 "data_quality alerts below %.3f to %s", s.topic_predictions, self.start, 100 * self.checker.sample,
                 self.checker.settle_s, self.checker.grace_s, self.checker.rate.min_rate, s.topic_drift)
        self.ready.set()
        next_report = time.monotonic() + 10
        try:
            while not self.stop_event.is_set():
                for msg in consumer.consume(1000, 0.2):
                    if msg.error() is not None:
                        continue
                    try:
                        self.checker.offer(Prediction.decode(msg.value()))
                    except ContractError as exc:
                        log.debug("skipping %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
                if self.checker.judge_due():
                    self._publish(producer)
                if self.metrics is not None:
                    self.metrics.update(self.checker.rate, len(self.checker.pending))
                if time.monotonic() >= next_report:
                    self._report()
                    next_report = time.monotonic() + 10
                producer.poll(0)
        finally:
            self._report()
            producer.flush(10)
            consumer.close()

    def _publish(self, producer) -> None:
        checker = self.checker
        for model, version in checker.latest.items():
            for alert in checker.rate.alerts(model, version, time.time()):
                producer.produce(self.settings.topic_drift, alert.encode(), alert.key())
                self.alerts_published += 1
                log.warning("consistency of %s fell to %.4f (threshold %.4f): data_quality alert %s",
                            alert.subject, alert.statistic, alert.threshold, alert.alert_id)
                if self.on_alert is not None:
                    self.on_alert(alert)

    def _report(self) -> None:
        import json

        summary = self.checker.rate.summary()
        summary.update(judged=self.checker.judged, pending=len(self.checker.pending), ts=time.time(),
                       alerts=self.alerts_published, mismatches=list(self.checker.mismatches)[-20:])
        rate = summary["consistency_rate"]
        log.info("consistency %s over %d feature values of %d predictions (%d pending, %d alerts)",
                 "n/a" if rate is None else f"{rate:.4f}", summary["features_compared"], self.checker.judged,
                 len(self.checker.pending), self.alerts_published)
        if self.summary_file is not None:
            self.summary_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.summary_file.with_name(f".{self.summary_file.name}.tmp")
            tmp.write_text(json.dumps(summary, default=str))
            tmp.replace(self.summary_file)
