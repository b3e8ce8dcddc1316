"""When the monitor asks for a retraining: the policy, its state across a restart, and its config checks."""

from __future__ import annotations

import json

import pytest

from freshet.contracts import DriftAlert
from freshet.features import AggregationSpec, FeatureRegistry, ViewSpec
from freshet.monitor.service import MonitorSetupError, RetrainPolicy, build, default_config, format_alert, known_inputs


def alert(aid: str, ts: float, kind: str = "feature", model: str = "fraud") -> DriftAlert:
    return DriftAlert(aid, model, "1", kind, "amount", "adwin", 3.0, 2.0, 100, ts)


def test_one_alert_of_a_retraining_kind_is_enough_by_default():
    req = RetrainPolicy().observe(alert("a1", 100.0))
    assert req is not None and req.reason == ["a1"] and req.model == "fraud" and req.ts == 100.0


def test_data_quality_alerts_do_not_retrain_unless_configured():
    assert RetrainPolicy().observe(alert("dq", 1.0, "data_quality")) is None
    assert RetrainPolicy(kinds=["data_quality"]).observe(alert("dq", 1.0, "data_quality")) is not None


def test_alerts_older_than_the_window_do_not_count_towards_min_alerts():
    policy = RetrainPolicy(min_alerts=2, window_s=60)
    assert policy.observe(alert("a1", 0.0)) is None
    assert policy.observe(alert("a2", 100.0)) is None  # a1 fell out of the window
    assert policy.observe(alert("a3", 130.0)).reason == ["a2", "a3"]


def test_cooldown_is_per_model_and_alerts_during_it_are_cited_by_the_next_request():
    policy = RetrainPolicy(cooldown_s=600, window_s=1000)
    assert policy.observe(alert("a1", 0.0)) is not None
    assert policy.observe(alert("b1", 10.0, model="other")) is not None
    assert policy.observe(alert("a2", 300.0)) is None
    assert policy.observe(alert("a3", 700.0)).reason == ["a2", "a3"]


def test_alerts_during_a_cooldown_are_requested_once_when_it_ends_without_another_alert():
    policy = RetrainPolicy(cooldown_s=60, window_s=120)
    assert policy.observe(alert("a1", 0.0)) is not None
    assert policy.observe(alert("a2", 20.0)) is None
    assert policy.observe(alert("b1", 25.0, model="other")) is not None
    assert policy.due(59.0) == []
    [request] = policy.due(60.0)
    assert (request.model, request.reason, request.ts) == ("fraud", ["a2"], 60.0)
    assert policy.due(200.0) == []  # nothing pending any more


def test_alerts_that_left_the_window_during_the_cooldown_are_not_requested():
    policy = RetrainPolicy(cooldown_s=600, window_s=60)
    assert policy.observe(alert("a1", 0.0)) is not None
    assert policy.observe(alert("a2", 100.0)) is None
    assert policy.due(600.0) == []
    assert policy.observe(alert("a3", 650.0)).reason == ["a3"]


def test_the_same_alert_replayed_is_counted_once():
    policy = RetrainPolicy(min_alerts=2)
    assert policy.observe(alert("a1", 0.0)) is None
    assert policy.observe(alert("a1", 0.0)) is None


def test_request_ids_are_deterministic_so_a_replay_republishes_the_same_request():
    assert RetrainPolicy().observe(alert("a1", 5.0)).request_id == RetrainPolicy().observe(alert("a1", 5.0)).request_id


def test_policy_state_survives_a_restart_as_json():
    policy = RetrainPolicy(min_alerts=2, cooldown_s=600)
    policy.observe(alert("a1", 0.0))
    policy.observe(alert("a2", 1.0))  # a request at t=1, cooldown running
    policy.observe(alert("a3", 2.0))
    restored = RetrainPolicy(min_alerts=2, cooldown_s=600)
    restored.load_state(json.loads(json.dumps(policy.state_dict())))
    assert restored.observe(alert("a4", 100.0)) is None  # still cooling down
    assert restored.observe(alert("a5", 601.0)).reason == ["a3", "a4", "a5"]


@pytest.mark.parametrize("bad, message", [
    ({"kinds": ["feature", "latency"]}, "'latency'"),
    ({"min_alerts": 0}, "min_alerts"),
    ({"cooldown": 5}, "'cooldown'"),
])
def test_a_bad_policy_fails_naming_the_setting(bad, message):
    with pytest.raises(MonitorSetupError, match=message):
        RetrainPolicy.from_dict(bad)


def _registry() -> FeatureRegistry:
    view = ViewSpec("card_txn_stats", ("card_id",), ("STRING",), 0, "transactions", "event_ts",
                    {"card_id": "string", "amount": "float", "event_ts": "timestamp"}, 0,
                    (AggregationSpec("sum_amount_300s", "amount", "sum", 300, 60, "DOUBLE"),
                     AggregationSpec("sum_amount_86400s", "amount", "sum", 86400, 300, "DOUBLE")), "")
    return FeatureRegistry("freshet", {"card_txn_stats": view},
                           {"fraud_model_v1": ["card_txn_stats:sum_amount_300s", "card_txn_stats:sum_amount_86400s"]})


def test_known_inputs_are_registry_features_and_event_fields():
    assert known_inputs(_registry()) == {"card_txn_stats:sum_amount_300s", "card_txn_stats:sum_amount_86400s",
                                         "card_id", "amount"}


def test_default_config_watches_the_feature_service_up_to_an_hour_and_amount():
    cfg = default_config(_registry())
    assert cfg["models"][0]["numeric_features"] == ["card_txn_stats:sum_amount_300s", "amount"]
    assert len(default_config(_registry(), max_window_s=None)["models"][0]["numeric_features"]) == 3
    with pytest.raises(MonitorSetupError, match="'nope'"):
        default_config(_registry(), service="nope")


def test_a_config_naming_an_unknown_feature_or_detector_fails_naming_it():
    with pytest.raises(MonitorSetupError, match="card_txn_stats:sum_amount_301s"):
        build({"models": [{"model": "fraud", "numeric_features": ["card_txn_stats:sum_amount_301s"]}]},
              known_inputs(_registry()))
    with pytest.raises(MonitorSetupError, match="cusum"):
        build({"models": [{"model": "fraud", "numeric_features": ["amount"], "feature_detector": "cusum"}]},
              known_inputs(_registry()))
    with pytest.raises(MonitorSetupError, match="no model"):
        build({"models": []}, known_inputs(_registry()))


def test_alert_lines_name_model_kind_subject_and_id():
    line = format_alert(alert("abc", 1_700_000_000.0))
    assert line.startswith("2023-11-14T22:13:20Z fraud v1 feature amount: adwin statistic 3 (threshold 2)")
    assert line.endswith("(alert abc)")
