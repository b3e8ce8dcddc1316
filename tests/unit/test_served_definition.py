"""One definition of a served feature, without a broker: recomputation as served, the training
source switch, and the consistency rate with its alert rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from freshet.features import AggregationSpec, ViewSpec
from freshet.monitor.consistency import ConsistencyRate
from freshet.settings import SettingsError, load_settings
from freshet.stream.pointintime import ServedFeatures, StreamTime, features_at_requests, judge
from freshet.training.consistency import sampled
from freshet.training.served import attach_requests, use_served

VIEW = ViewSpec("card", ("card_id",), ("STRING",), 0, "tx", "ts", {}, 30, (
    AggregationSpec("count_amount_300s", "amount", "count", 300, 60, "INT64"),
    AggregationSpec("sum_amount_300s", "amount", "sum", 300, 60, "DOUBLE"),
    AggregationSpec("last_amount_3600s", "amount", "last", 3600, 60, "DOUBLE"),
), "")


def _events(rows):
    return pd.DataFrame(rows, columns=["card_id", "amount", "ts", "_ingested_at", "_partition", "_offset"])


def test_a_request_sees_only_the_events_the_stream_had_accepted_by_its_time():
    events = _events([("a", 1.0, 100.0, 100.1, 0, 0), ("a", 2.0, 95.0, 130.0, 0, 1)])  # out of order, accepted late
    got = features_at_requests(events, VIEW, [("a",), ("a",)], np.array([120.0, 140.0]), np.array([True, True]))
    assert [g["count_amount_300s"] for g in got] == [1, 2]
    by_event_time = features_at_requests(events, VIEW, [("a",)], np.array([120.0]))
    assert by_event_time[0]["count_amount_300s"] == 2  # the old definition counts what serving had not seen


def test_an_idle_entity_reads_empty_windows_at_the_stream_clock_of_the_request():
    events = _events([("a", 5.0, 100.0, 100.0, 0, 0), ("b", 1.0, 1000.0, 1000.0, 0, 1)])
    got = features_at_requests(events, VIEW, [("a",)], np.array([1001.0]), np.array([True]))[0]
    assert got == {"count_amount_300s": 0, "sum_amount_300s": 0.0, "last_amount_3600s": 5.0}


def test_the_stream_clock_follows_simulated_event_time_not_the_wall_clock():
    clock = StreamTime(ahead_s=86400)
    clock.add([5000.0, 5100.0], [10.0, 20.0])  # events 83 minutes ahead of the wall clock
    assert clock.at(25.0) == pytest.approx(5105.0)
    assert clock.at(15.0) == pytest.approx(5005.0)
    assert StreamTime(ahead_s=0).at(25.0) == 25.0


def test_an_event_still_on_its_way_to_redis_is_allowed_for_within_the_grace_only():
    served = ServedFeatures(VIEW)
    served.add(_events([("a", 1.0, 100.0, 100.0, 0, 0), ("a", 2.0, 101.0, 101.0, 0, 1)]))
    assert judge({"count_amount_300s": 1}, served.candidates(("a",), 101.5, grace_s=1.0), ["count_amount_300s"]) \
        == {"count_amount_300s": True}
    assert judge({"count_amount_300s": 1}, served.candidates(("a",), 103.0, grace_s=1.0), ["count_amount_300s"]) \
        == {"count_amount_300s": False}


def test_an_entity_never_seen_is_served_null_and_that_is_not_a_mismatch():
    served = ServedFeatures(VIEW)
    cands = served.candidates(("nobody",), 100.0, grace_s=1.0)
    assert judge({"count_amount_300s": None}, cands, ["count_amount_300s"]) == {"count_amount_300s": True}


def test_training_can_take_the_values_served_instead_of_the_recomputed_ones():
    examples = pd.DataFrame({"request_id": ["r1", "r2"], "event_ts": [1.0, 2.0]})
    logged = pd.DataFrame({"request_id": ["r1"], "request_ts": [10.5],
                           "features": ['{"card:count_amount_300s": 7, "amount": 3.0}']})
    joined = attach_requests(examples, logged)
    assert joined["request_ts"].tolist()[0] == 10.5 and np.isnan(joined["request_ts"].tolist()[1])
    data = joined.assign(card__count_amount_300s=[1, 2])
    use_served(data, ["card:count_amount_300s"])
    assert data["card__count_amount_300s"].tolist() == [7, 2]  # r2 was never served: recomputed


def test_a_feature_below_the_rate_alerts_once_and_again_only_after_it_recovered():
    rate = ConsistencyRate(min_rate=0.9, window=10, min_compared=10)
    for ok in [True] * 8 + [False] * 2:
        rate.observe("f", ok)
    assert [a.kind for a in rate.alerts("m", "1", 0.0)] == ["data_quality"]
    for _ in range(10):
        rate.observe("f", True)
    assert rate.alerts("m", "1", 1.0) == [] and rate.rate("f") == 1.0
    for _ in range(3):
        rate.observe("f", False)
    assert [a.statistic for a in rate.alerts("m", "1", 2.0)] == [0.7]


def test_the_sample_is_the_same_requests_every_run():
    ids = [f"tx{i}" for i in range(2000)]
    picked = [i for i in ids if sampled(i, 0.1)]
    assert picked == [i for i in ids if sampled(i, 0.1)] and 150 < len(picked) < 250


def test_consistency_and_training_settings_are_checked_at_start():
    s = load_settings({"FRESHET_CONSISTENCY_MIN_RATE": "0.95", "FRESHET_TRAINING_FEATURES": "served"})
    assert s.consistency_min_rate == 0.95 and s.training_features == "served"
    with pytest.raises(SettingsError, match="FRESHET_CONSISTENCY_SAMPLE"):
        load_settings({"FRESHET_CONSISTENCY_SAMPLE": "1.5"})
    with pytest.raises(SettingsError, match="FRESHET_TRAINING_FEATURES"):
        load_settings({"FRESHET_TRAINING_FEATURES": "logged"})
