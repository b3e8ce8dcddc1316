"""Restart: a JSON snapshot restores the monitor without an alert flood and without a new warm-up."""

from __future__ import annotations

import json

import numpy as np
import pytest

from freshet.contracts import Label, Prediction
from freshet.monitor import STATE_FORMAT, DriftMonitor, ModelConfig, MonitorConfig

FEATURES = ["amount", "amount_mean_1h", "txn_count_5m"]


def make_monitor(features=FEATURES, **overrides) -> DriftMonitor:
    cfg = ModelConfig("fraud", numeric_features=features, categorical_features=["channel"], warmup=1000,
                      label_warmup=500, **overrides)
    return DriftMonitor(MonitorConfig(models=[cfg], seed=5))


def traffic(seed: int, start: int, n: int, mean_shift: float = 0.0) -> list[Prediction]:
    rng = np.random.default_rng([seed, start])
    amount, mean, count = rng.lognormal(3, 1, n), rng.normal(50 + 10 * mean_shift, 10, n), rng.poisson(3, n)
    channel = rng.choice(["web", "pos", "app"], size=n, p=[0.6, 0.3, 0.1])
    score = 1 / (1 + np.exp(-rng.normal(-1, 1.5, n)))
    return [Prediction(f"r{start + i}", "fraud", "1", {}, {"amount": a, "amount_mean_1h": m, "txn_count_5m": c,
                                                         "channel": ch}, {"score": s}, ts=float(start + i))
            for i, (a, m, c, ch, s) in enumerate(zip(amount.tolist(), mean.tolist(), count.tolist(),
                                                       channel.tolist(), score.tolist()))]


def feed(monitor: DriftMonitor, predictions, label_rng=None) -> list:
    alerts = []
    for p in predictions:
        alerts += monitor.observe(p)
        if label_rng is not None:
            wrong = int(label_rng.random() < 0.15)
            alerts += monitor.observe_label(Label(label=int(p.score >= 0.5) ^ wrong, request_id=p.request_id, ts=p.ts))
    return alerts


def restarted(monitor: DriftMonitor, **overrides) -> DriftMonitor:
    snapshot = json.loads(json.dumps(monitor.state_dict(), allow_nan=False))  # strict JSON, no pickle
    fresh = make_monitor(**overrides)
    fresh.load_state(snapshot)
    return fresh


def test_restart_raises_no_alert_flood_on_an_unchanged_stream():
    rng = np.random.default_rng(1)
    before = make_monitor()
    assert feed(before, traffic(1, 0, 8000), rng) == []
    after = restarted(before)
    assert after.counters()["models"]["fraud"]["warming_up"] == []
    assert feed(after, traffic(1, 8000, 30_000), rng) == []


def test_restart_keeps_counters_and_waiting_predictions():
    before = make_monitor()
    feed(before, traffic(2, 0, 3000))
    before.observe({"schema": "freshet.predictions/1", "request_id": "x"})  # contract violation
    after = restarted(before)
    assert after.counters() == before.counters()
    # r2900 waits in the label join; r2999 still sits in the unfinished batch
    after.observe_label(Label(label=1, request_id="r2900", ts=3000.0))
    after.observe_label(Label(label=1, request_id="r2999", ts=3000.0))
    assert after.counters()["models"]["fraud"]["outcomes"] == 2
    after.flush()
    assert after.counters()["labels"]["joined"] == 2 and after.counters()["labels"]["duplicate"] == 0


def test_restarted_detectors_still_find_a_shift():
    before = make_monitor()
    feed(before, traffic(3, 0, 5000))
    after = restarted(before)
    feed(after, traffic(3, 5000, 2000))
    alerts = feed(after, traffic(3, 7000, 300, mean_shift=1.0))
    assert ("feature", "amount_mean_1h") in {(a.kind, a.subject) for a in alerts}


def test_restart_does_not_repeat_an_alert_inside_its_cooldown():
    before = make_monitor(cooldown=10_000)
    feed(before, traffic(4, 0, 3000))
    broken = traffic(4, 3000, 2000)
    for p in broken:
        del p.features["txn_count_5m"]
    assert [a.detector for a in feed(before, broken)] == ["missing_rate"]
    after = restarted(before, cooldown=10_000)
    still_broken = traffic(4, 5000, 4000)
    for p in still_broken:
        del p.features["txn_count_5m"]
    assert feed(after, still_broken) == []


def test_a_snapshot_for_other_features_starts_those_afresh():
    before = make_monitor()
    feed(before, traffic(5, 0, 3000))
    after = make_monitor(features=["amount", "amount_mean_1h"])
    fresh = after.load_state(json.loads(json.dumps(before.state_dict())))
    assert fresh == {"fraud": ["numeric"]}
    assert "amount" in after.counters()["models"]["fraud"]["warming_up"]


def test_load_state_refuses_something_that_is_not_a_snapshot():
    with pytest.raises(ValueError, match=STATE_FORMAT):
        make_monitor().load_state({"models": {}})
