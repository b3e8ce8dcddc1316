"""Configuration fails at start-up naming what is wrong; bad records are counted, never raised."""

from __future__ import annotations

import numpy as np
import pytest

from freshet.contracts import Label, Prediction
from freshet.monitor import ConfigError, DriftMonitor, ModelConfig, MonitorConfig


def test_unknown_feature_detector_fails_at_construction_naming_it():
    with pytest.raises(ConfigError, match=r"unknown detector 'cusum' for numeric features of model 'fraud'"):
        DriftMonitor([ModelConfig("fraud", numeric_features=["x"], feature_detector="cusum")])


def test_unknown_error_detector_fails_at_construction_naming_it():
    with pytest.raises(ConfigError, match=r"unknown detector 'kswin' for labelled outcomes.*adwin, hddm_a"):
        DriftMonitor({"models": [{"model": "fraud", "error_detector": "kswin"}]})


def test_detector_names_are_forgiving_about_case():
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["x"], feature_detector="PageHinkley",
                                        error_detector="HDDM_A")])
    assert monitor.models["fraud"].config.feature_detector == "page_hinkley"


def test_unknown_feature_fails_the_start_up_check_naming_it():
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["amount_sum_5m", "amount_typo"],
                                        categorical_features=["channel"])])
    monitor.check_features(["amount_sum_5m", "amount_typo", "channel", "country"])
    with pytest.raises(ConfigError, match=r"model 'fraud': 'amount_typo'"):
        monitor.check_features(["amount_sum_5m", "channel"])
    with pytest.raises(ConfigError, match="'amount_typo'"):
        DriftMonitor(monitor.config, known_features=["amount_sum_5m", "channel"])


def test_unknown_setting_in_a_dict_config_fails_naming_it():
    with pytest.raises(ConfigError, match=r"unknown monitor setting\(s\) 'warm_up' for model 'fraud'"):
        MonitorConfig.from_dict({"models": [{"model": "fraud", "warm_up": 10}]})
    with pytest.raises(ConfigError, match="'label_wait'"):
        DriftMonitor({"models": [], "label_wait": 5})


@pytest.mark.parametrize("settings, message", [
    ({"alpha": 0}, "alpha must be in"),
    ({"warmup": 10, "block_size": 16}, "at least two blocks"),
    ({"numeric_features": ["x"], "categorical_features": ["x"]}, "'x' listed twice"),
    ({"standardise": "minmax"}, "unknown standardisation 'minmax'"),
])
def test_invalid_values_fail_naming_the_setting(settings, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig("fraud", **settings)


def good_prediction(i: int, rng) -> Prediction:
    return Prediction(f"r{i}", "fraud", "1", {}, {"amount": float(rng.lognormal(3, 1)), "channel": "web"},
                      {"score": float(rng.random())}, ts=float(i))


def test_bad_records_are_counted_and_never_crash():
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["amount"], categorical_features=["channel"],
                                        warmup=200)])
    rng = np.random.default_rng(0)
    for i in range(500):
        monitor.observe(good_prediction(i, rng))
    bad = [
        b"{not json",
        b'{"schema": "freshet.labels/1", "label": 1}',
        {"schema": "freshet.predictions/1", "request_id": "x"},
        {"schema": "freshet.predictions/1", "request_id": "y", "model": "fraud", "model_version": "1",
         "entities": {}, "features": ["not", "a", "dict"], "prediction": 0.3, "ts": 1.0},
        12345,
        None,
        Prediction("r-a", "fraud", "1", {}, {"amount": "lots", "channel": "web"}, {"score": 0.2}, ts=501.0),
        Prediction("r-b", "fraud", "1", {}, {"amount": [1, 2], "channel": ["web"]}, {"score": "high"}, ts=502.0),
        Prediction("r-c", "fraud", "1", {}, {"channel": None}, {"label": 1}, ts=503.0),
        Prediction("r-d", "fraud", "1", {}, "features", 0.5, ts=504.0),
        Prediction("r-e", "fraud", "1", {}, {"amount": float("inf")}, 1.5, ts=505.0),
        Prediction("r-f", "other_model", "1", {}, {}, 0.5, ts=506.0),
    ]
    for record in bad:
        assert monitor.observe(record) == []
    for i in range(505, 540):
        monitor.observe(good_prediction(i, rng))
    for label in [b"[]", {"schema": "freshet.labels/1", "label": "yes", "request_id": "r1"},
                  Label(label=1), Label(label=7, request_id="r510", ts=600.0), Label(label=1, request_id=5, ts=1.0)]:
        assert monitor.observe_label(label) == []
    assert monitor.observe_deadletter_rate(float("nan")) == []
    monitor.flush()
    counters = monitor.counters()
    # 7 predictions, 4 labels (not an object, a str label, no request id nor entities, an int
    # request id) and the NaN dead-letter rate
    assert sum(counters["rejected"].values()) == 12
    assert counters["unmonitored"] == {"other_model": 1}
    model = counters["models"]["fraud"]
    assert model["invalid_values"] == {"amount": 2}  # "lots" and [1, 2]; inf and a missing key are missing
    assert model["invalid_scores"] == 3              # "high", no score, and 1.5 outside [0, 1]
    assert model["invalid_outcomes"] == 1            # label 7 for a classifier
    assert model["predictions"] == 500 + 4 + 35  # r-d was rejected, r-f is not monitored


def test_importing_the_package_leaves_river_unloaded_until_a_name_is_used():
    import subprocess
    import sys

    code = "import sys, monitor; assert 'river' not in sys.modules; monitor.DriftMonitor; assert 'river' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
