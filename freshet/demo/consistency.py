"""The demo's consistency reading: once traffic is drained, a sample of the run's served predictions
judged against their features recomputed from the raw log (what `freshet consistency` does live).

Owns `judge_run`, which returns what the report shows: the rate over the run, per 10 s of
traffic, and the least consistent features.
"""

from __future__ import annotations

import os
import time
from typing import Any

from freshet.contracts import ContractError, Prediction
from freshet.features import FeatureRegistry
from freshet.settings import Settings


def read_predictions(settings: Settings, idle_s: float = 3.0, timeout_s: float = 60.0) -> list[Prediction]:
    """Every prediction on the prediction topic, oldest first (read until it stays quiet)."""
    from confluent_kafka import TopicPartition

    from freshet import kafka

    topic = settings.topic_predictions
    consumer = kafka.consumer(settings, f"freshet-demo-consistency-{os.getpid()}")
    out: list[Prediction] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            return out
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        deadline, quiet_since = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
            msgs = consumer.consume(5000, 0.5)
            if msgs:
                quiet_since = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    try:
                        out.append(Prediction.decode(m.value()))
                    except ContractError:
                        pass
    finally:
        consumer.close()
    return sorted(out, key=lambda p: p.ts)


def judge_run(settings: Settings, registry: FeatureRegistry, t0: float, sample: float | None = None,
              bucket_s: float = 10.0) -> dict[str, Any]:
    """The run's sampled predictions judged: rate, values compared, and the rate per `bucket_s`
    seconds of traffic (t relative to `t0`, the first event)."""
    from freshet.training.consistency import ServedConsistency

    started = time.monotonic()
    checker = ServedConsistency(settings, registry, sample=sample, settle_s=0.0)
    predictions = [p for p in read_predictions(settings) if checker.offer(p)]
    checker.pending.clear()
    checker.read_raw_log()
    buckets: dict[int, list[int]] = {}
    for p in predictions:
        verdicts = checker.judge(p)
        b = buckets.setdefault(int((float(p.ts) - t0) // bucket_s), [0, 0])
        b[0] += len(verdicts)
        b[1] += sum(verdicts.values())
    summary = checker.rate.summary()
    per_feature = sorted(((f, c["matched"] / c["compared"]) for f, c in summary["features"].items() if c["compared"]),
                         key=lambda fc: fc[1])
    keys = sorted(buckets)
    return {
        "rate": summary["consistency_rate"], "compared": summary["features_compared"],
        "judged": checker.judged, "sample": checker.sample, "grace_s": checker.grace_s,
        "timeline": {"t": [(k + 0.5) * bucket_s for k in keys],
                     "rate": [buckets[k][1] / buckets[k][0] if buckets[k][0] else None for k in keys],
                     "compared": [buckets[k][0] for k in keys]},
        "worst": [[f, round(r, 4)] for f, r in per_feature[:5]],
        "mismatches": list(checker.mismatches)[:10],
        "seconds": round(time.monotonic() - started, 1),
    }
