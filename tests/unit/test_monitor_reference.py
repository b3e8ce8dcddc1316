"""The monitor judges a version against the reference logged with it from its first prediction, switches
reference when serving switches version, and holds windowed features whose window is not full yet."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.contracts import Prediction
from freshet.monitor import DriftMonitor, ModelConfig
from freshet.reference import TrainingReference

FEATURES = ["card:sum_amount_300s", "amount", "card:count_amount_86400s"]


def _rows(rng, n, shift=0.0):
    """Inputs like the fraud model's: a lognormal sum, a lognormal amount, a Poisson count."""
    return np.column_stack([rng.lognormal(3.0 + shift, 0.8, n), rng.lognormal(3.5, 0.7, n),
                            rng.poisson(170, n).astype(float)])


def _reference(rng, shift=0.0, history_s=200_000.0):
    X = _rows(rng, 4000, shift)
    return TrainingReference.build(X, FEATURES, scores=rng.beta(1, 30, 4000),
                                   windows={"card:sum_amount_300s": 300, "card:count_amount_86400s": 86400},
                                   history_start=0.0, row_times=np.linspace(history_s, history_s + 3600, 4000)).to_dict()


def _monitor(references, **cfg):
    config = ModelConfig("fraud", numeric_features=FEATURES, estimate=False, join_labels=False, **cfg)
    return DriftMonitor([config], references=lambda model, version: references.get(version))


def _predictions(rng, monitor, n, version="1", shift=0.0, start=0):
    alerts = []
    X = _rows(rng, n, shift)
    scores = rng.beta(1, 30, n)
    for i in range(n):
        p = Prediction(f"r{start + i}", "fraud", version, {}, dict(zip(FEATURES, X[i].tolist())),
                       {"score": float(scores[i]), "label": 0}, ts=1_000_000.0 + start + i)
        alerts += monitor.observe(p)
    return alerts + monitor.flush()


def test_a_shifted_feature_alerts_within_a_few_hundred_predictions_of_the_first():
    rng = np.random.default_rng(1)
    monitor = _monitor({"1": _reference(rng)})
    alerts = _predictions(rng, monitor, 400, shift=0.5)
    subjects = {(a.kind, a.subject) for a in alerts}
    assert ("feature", "card:sum_amount_300s") in subjects, subjects
    assert not {s for k, s in subjects if s != "card:sum_amount_300s"}, subjects
    assert monitor.counters()["models"]["fraud"]["reference"] == "training v1"


def test_unshifted_traffic_raises_nothing_from_the_first_prediction():
    rng = np.random.default_rng(2)
    monitor = _monitor({"1": _reference(rng)})
    assert _predictions(rng, monitor, 20_000) == []
    assert monitor.counters()["models"]["fraud"]["warming_up"] == ["outcomes"]  # features judged at once


def test_a_new_version_is_judged_against_its_own_reference():
    rng = np.random.default_rng(3)
    monitor = _monitor({"1": _reference(rng), "2": _reference(rng, shift=0.5)})
    assert _predictions(rng, monitor, 2000) == []
    # serving switches to v2, trained on the shifted world: the shifted traffic is its normal
    assert _predictions(rng, monitor, 10_000, version="2", shift=0.5, start=2000) == []
    assert monitor.counters()["models"]["fraud"]["reference"] == "training v2"


def test_a_version_without_a_reference_warms_up_on_its_traffic():
    rng = np.random.default_rng(4)
    monitor = _monitor({})
    assert _predictions(rng, monitor, 1000) == []
    assert "amount" in monitor.counters()["models"]["fraud"]["warming_up"]


def test_a_window_longer_than_the_training_history_is_held_and_announced():
    rng = np.random.default_rng(5)
    monitor = _monitor({"1": _reference(rng, history_s=7200.0)})  # 2 h of history behind a 1-day window
    alerts = _predictions(rng, monitor, 3000, shift=0.0)
    notices = [a for a in alerts if a.detector == "warming_up"]
    assert [(a.kind, a.subject, a.threshold) for a in notices] == [("data_quality", "card:count_amount_86400s", 86400.0)]
    until = notices[0].window["end"]
    assert until == pytest.approx(1_000_000.0 + 86400 - (7200 + 3600))
    assert monitor.counters()["models"]["fraud"]["warming_until"] == {"card:count_amount_86400s": until}
    assert [a for a in alerts if a.detector != "warming_up"] == []


def test_without_a_reference_windowed_features_wait_for_their_window():
    rng = np.random.default_rng(6)
    monitor = _monitor({}, windows={"card:count_amount_86400s": 86400.0, "card:sum_amount_300s": 300.0},
                       warmup=500)
    alerts = _predictions(rng, monitor, 1000)
    assert {a.subject for a in alerts if a.detector == "warming_up"} == {"card:count_amount_86400s",
                                                                          "card:sum_amount_300s"}
    held = monitor.counters()["models"]["fraud"]["warming_until"]
    assert held == {"card:count_amount_86400s": 1_000_000.0 + 86400}  # the 5-minute one is warm after 300 s


def test_a_restart_keeps_the_training_reference_and_the_holds():
    rng = np.random.default_rng(7)
    monitor = _monitor({"1": _reference(rng, history_s=7200.0)})
    _predictions(rng, monitor, 500)
    restarted = _monitor({})
    restarted.load_state(monitor.state_dict())
    c = restarted.counters()["models"]["fraud"]
    assert c["reference"] == "training v1" and "card:count_amount_86400s" in c["warming_until"]
    assert _predictions(rng, restarted, 3000, start=500) == []
