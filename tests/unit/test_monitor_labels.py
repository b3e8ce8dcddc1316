"""Label join: labels meet their predictions within a bounded wait; late and missing ones are counted."""

from __future__ import annotations

import json

from freshet.contracts import Label, Prediction
from freshet.monitor import DriftMonitor, LabelJoin, ModelConfig, MonitorConfig


def wait(join: LabelJoin, rid: str, ts: float, score: float = 0.8, entities=None) -> list:
    return join.add(rid, "fraud", "1", score=score, predicted=int(score >= 0.5), ts=ts, entities=entities)


def test_label_is_joined_to_its_prediction_by_request_id():
    join = LabelJoin(max_wait_s=60)
    wait(join, "r1", 0.0, score=0.9)
    (outcome,) = join.match("r1", label=0, ts=30.0)
    assert (outcome.request_id, outcome.model, outcome.score, outcome.predicted, outcome.label) == ("r1", "fraud", 0.9, 1, 0)
    assert (outcome.prediction_ts, outcome.label_ts) == (0.0, 30.0)
    assert join.counters() == {"joined": 1, "missing": 0, "late": 0, "early": 0, "unmatched": 0, "duplicate": 0,
                               "pending": 0, "waiting_labels": 0}


def test_prediction_unlabelled_after_the_wait_counts_as_missing_and_its_label_as_late():
    join = LabelJoin(max_wait_s=60)
    wait(join, "r1", 0.0)
    wait(join, "r2", 61.0)  # event time moves on: r1 has waited too long
    assert join.counters()["missing"] == 1 and join.counters()["pending"] == 1
    assert join.match("r1", label=1, ts=62.0) == []
    assert join.counters()["late"] == 1 and join.counters()["joined"] == 0


def test_label_before_its_prediction_waits_for_it():
    join = LabelJoin(max_wait_s=60)
    assert join.match("r1", label=1, ts=5.0) == []
    assert join.counters()["early"] == 1 and join.counters()["waiting_labels"] == 1
    (outcome,) = wait(join, "r1", 4.0)
    assert outcome.label == 1 and join.counters()["joined"] == 1 and join.counters()["waiting_labels"] == 0


def test_label_for_a_prediction_that_never_comes_is_unmatched_after_the_wait():
    join = LabelJoin(max_wait_s=60)
    wait(join, "r0", 0.0)
    join.match("ghost", label=1, ts=0.0)
    wait(join, "r1", 100.0)
    assert join.counters()["unmatched"] == 1 and join.counters()["waiting_labels"] == 0


def test_label_read_before_any_prediction_waits_from_the_first_prediction():
    join = LabelJoin(max_wait_s=60)
    join.match("ghost", label=1, ts=0.0)
    join.match("r2", label=0, ts=0.0)
    wait(join, "r1", 1000.0)  # the wait starts here, whatever the labels' own time
    assert join.counters()["waiting_labels"] == 2
    assert [o.request_id for o in wait(join, "r2", 1050.0)] == ["r2"]
    wait(join, "r3", 1061.0)
    assert join.counters()["unmatched"] == 1 and join.counters()["waiting_labels"] == 0


def test_labels_on_another_clock_join_whether_read_before_or_after_their_predictions():
    # predictions stamped by serving (now); labels stamped by the labelling system's clock, a
    # year behind: only prediction time measures the wait
    join = LabelJoin(max_wait_s=60)
    before, outcomes = [], []
    for i in range(100):
        if i % 2 == 0:  # the labels topic was read a little ahead
            before.append(join.match(f"r{i}", label=1, ts=1.7e9 + i))
        outcomes += wait(join, f"r{i}", 1.73e9 + i)
        if i % 2 and i >= 5:
            outcomes += join.match(f"r{i - 4}", label=0, ts=1.7e9 + 3600 + i)
    assert before == [[]] * 50
    counters = join.counters()
    assert (counters["joined"], counters["unmatched"], counters["late"], counters["missing"]) == (98, 0, 0, 0)
    assert {o.request_id for o in outcomes} == {f"r{i}" for i in range(100)} - {"r97", "r99"}


def test_a_label_far_ahead_in_its_own_time_does_not_end_the_wait_of_other_predictions():
    join = LabelJoin(max_wait_s=60)
    wait(join, "r1", 0.0)
    wait(join, "r2", 1.0)
    assert len(join.match("r1", label=1, ts=1e6)) == 1
    assert len(join.match("r2", label=1, ts=2e6)) == 1
    assert join.counters()["missing"] == 0 and join.counters()["late"] == 0


def test_label_with_entities_matches_the_latest_prediction_of_that_entity_before_it():
    join = LabelJoin(max_wait_s=600, entity_keys=["card_id"])
    wait(join, "r1", 10.0, entities={"card_id": "c1"})
    wait(join, "r2", 20.0, entities={"card_id": "c2"})
    wait(join, "r3", 30.0, entities={"card_id": "c1"})
    wait(join, "r4", 50.0, entities={"card_id": "c1"})
    (outcome,) = join.match(None, label=1, ts=40.0, entities={"card_id": "c1"})
    assert outcome.request_id == "r3"
    assert join.match(None, label=1, ts=40.0, entities={"card_id": "c9"}) == []
    assert join.counters()["unmatched"] == 1


def test_second_label_for_the_same_prediction_is_a_duplicate():
    join = LabelJoin(max_wait_s=60)
    wait(join, "r1", 0.0)
    join.match("r1", label=1, ts=1.0)
    assert join.match("r1", label=0, ts=2.0) == []
    assert join.counters()["duplicate"] == 1 and join.counters()["joined"] == 1


def test_waiting_predictions_are_bounded_and_the_oldest_count_as_missing():
    join = LabelJoin(max_wait_s=1e9, max_pending=100)
    for i in range(150):
        wait(join, f"r{i}", float(i))
    assert join.counters()["pending"] == 100 and join.counters()["missing"] == 50
    assert join.match("r0", label=1, ts=200.0) == [] and join.counters()["late"] == 1


def test_join_state_survives_a_json_round_trip():
    join = LabelJoin(max_wait_s=60, entity_keys=["card_id"])
    wait(join, "r1", 0.0, entities={"card_id": "c1"})
    wait(join, "r2", 70.0, entities={"card_id": "c1"})
    join.match("early", label=1, ts=70.0)
    copy = LabelJoin(max_wait_s=60, entity_keys=["card_id"]).load_state(json.loads(json.dumps(join.state_dict())))
    assert copy.counters() == join.counters()
    assert copy.match("r1", label=1, ts=71.0) == [] and copy.counters()["late"] == 1
    assert [o.request_id for o in copy.match(None, label=1, ts=72.0, entities={"card_id": "c1"})] == ["r2"]


def test_join_state_from_before_labels_had_a_read_time_still_loads():
    join = LabelJoin(max_wait_s=60).load_state({"clock": 10.0, "early": [["r1", 1, 5.0]], "counts": {"early": 1}})
    assert [o.label for o in wait(join, "r1", 11.0)] == [1]


def test_monitor_counts_joined_late_and_missing_labels_across_the_stream():
    monitor = DriftMonitor(MonitorConfig(models=[ModelConfig("fraud", numeric_features=["x"], warmup=100)],
                                         label_wait_s=50))
    predictions = [Prediction(f"r{i}", "fraud", "1", {}, {"x": float(i % 7)}, {"score": 0.3}, ts=float(i))
                   for i in range(400)]
    for p in predictions:
        monitor.observe(p)
        if p.ts >= 60 and int(p.ts) % 2 == 0:
            # labels trail predictions by 60 s, beyond the 50 s wait: late
            monitor.observe_label(Label(label=0, request_id=f"r{int(p.ts) - 60}", ts=p.ts))
        if int(p.ts) % 2 == 1:
            monitor.observe_label(Label(label=1, request_id=p.request_id, ts=p.ts + 1))
    monitor.flush()
    labels = monitor.counters()["labels"]
    assert labels["joined"] == 200 and labels["late"] == 170
    # even-numbered predictions never got a label in time: missing once their wait is over
    assert labels["missing"] == 175 and labels["pending"] == 25
    assert monitor.counters()["models"]["fraud"]["outcomes"] == 200


def test_label_right_after_its_prediction_is_joined_at_once_and_only_once():
    monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["x"], warmup=100, block_size=16, batch_blocks=3)])
    p = Prediction("r1", "fraud", "1", {}, {"x": 1.0}, {"score": 0.7}, ts=1.0)
    monitor.observe(p)  # waits in the unfinished batch of 48
    monitor.observe_label(Label(label=0, request_id="r1", ts=2.0))
    assert monitor.counters()["models"]["fraud"]["outcomes"] == 1
    monitor.flush()
    labels = monitor.counters()["labels"]
    assert (labels["joined"], labels["early"], labels["duplicate"], labels["pending"]) == (1, 0, 0, 0)
