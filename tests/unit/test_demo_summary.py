"""The demo summary credits a drift only with versions trained for it: their training rows (the
--since-request cut-off) start at or after the injection. A version promoted after the drift but
trained on labels from before it counts with the older versions."""

import math

from freshet.demo.summary import error_buckets, judge_alerts, trained_for, trained_from

START_TS, SCALE = 1_000_000.0, 50.0


def _record(trainings=True):
    """Covariate at 60 s, concept at 165 s. v1 bootstrap; v2 trained from 62 s (for the covariate) and
    promoted at 172 s, after the concept drift; v3 trained from 172 s (for the concept), promoted at 260 s."""
    served = [(30.0, "1", 0, 0), (100.0, "1", 1, 0), (170.0, "1", 1, 0),
              (180.0, "2", 1, 0), (200.0, "2", 1, 0), (250.0, "2", 0, 0),
              (270.0, "3", 0, 0), (280.0, "3", 0, 0), (290.0, "3", 1, 0)]
    data = {
        "meta": {"start_ts": START_TS, "plan": {"time_scale": SCALE},
                 "drift": [{"kind": "covariate", "t": 60.0}, {"kind": "concept", "t": 165.0}]},
        "alerts": [{"t": 61.0, "kind": "feature", "subject": "f:amount", "detector": "psi"},
                   {"t": 170.0, "kind": "performance", "subject": "error_rate", "detector": "ddm"}],
        "model_events": [{"t": -1.0, "version": "1", "stage": "champion"},
                         {"t": 172.0, "version": "2", "stage": "champion"},
                         {"t": 260.0, "version": "3", "stage": "champion"}],
        "predictions": {"t": [x[0] for x in served], "version": [x[1] for x in served],
                        "label": [x[2] for x in served], "truth": [x[3] for x in served]},
    }
    if trainings:
        data["trainings"] = [{"version": "1", "since": None},
                             {"version": "2", "since": START_TS + 62.0 * SCALE},
                             {"version": "3", "since": START_TS + 172.0 * SCALE},
                             {"version": None, "since": START_TS + 280.0 * SCALE}]  # refused: no version
    return data


def test_a_versions_training_cut_off_is_read_on_the_traffic_clock():
    assert trained_from(_record()) == {"1": -math.inf, "2": 62.0, "3": 172.0}
    assert trained_from(_record(trainings=False)) is None


def test_a_version_promoted_after_a_drift_but_trained_before_it_is_not_the_drifts():
    data = _record()
    assert trained_for(data, 60.0) == {"2", "3"}
    assert trained_for(data, 165.0) == {"3"}
    concept = judge_alerts(data, 300.0)["injections"][1]
    assert concept["promoted_version"] == "3" and concept["promotion_s"] == 95.0
    # v1 and v2 served between the drift and v3: 4 labelled predictions, 3 wrong; v3: 3, 1 wrong
    assert concept["error_rate_before_promotion"]["labelled_predictions"] == 4
    assert concept["error_rate_before_promotion"]["errors"] == 3
    assert concept["error_rate_after_promotion"]["labelled_predictions"] == 3
    assert concept["error_rate_after_promotion"]["errors"] == 1
    covariate = judge_alerts(data, 300.0)["injections"][0]
    assert covariate["promoted_version"] is None  # v2's promotion came after the next drift


def test_the_overall_buckets_use_the_same_rule():
    b = error_buckets(_record())
    assert b["before_drift"]["labelled_predictions"] == 1
    assert b["after_drift"]["labelled_predictions"] == 5   # v1 after 60 s, v2 after 165 s
    assert b["after_promotion"]["labelled_predictions"] == 3


def test_without_recorded_trainings_the_first_promotion_after_the_drift_counts():
    concept = judge_alerts(_record(trainings=False), 300.0)["injections"][1]
    assert concept["promoted_version"] == "2" and concept["promotion_s"] == 7.0
    assert concept["error_rate_before_promotion"]["labelled_predictions"] == 1
