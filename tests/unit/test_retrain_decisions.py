"""The retrainer's decisions without Kafka or MLflow: window, split, metrics, promotion rule, idempotency."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from freshet.contracts import ContractError, RetrainRequest
from freshet.training.dataset import TrainingWindow, dataset_fingerprint, join_labels_to_events, time_split
from freshet.training.evaluation import Decision, bootstrap_gains, decide_promotion, evaluate
from freshet.training.labels import label_row
from freshet.training.ledger import alert_tag, unhandled
from freshet.training.pipeline import fit_pipeline
from freshet.training.retrain import LabelWait, RetrainConfig
from freshet.training.worker import merge_requests


# --- split ---------------------------------------------------------------------------

def test_holdout_is_the_newest_share_by_event_time_whatever_the_row_order():
    rng = np.random.default_rng(0)
    ts = rng.permutation(np.arange(1000.0))
    train, hold = time_split(ts, 0.2)
    assert hold.sum() == 200 and train.sum() == 800
    assert ts[train].max() < ts[hold].min()


def test_rows_sharing_the_boundary_instant_are_all_held_out():
    train, hold = time_split(np.array([1.0, 2.0, 2.0, 2.0]), 0.25)
    assert hold.tolist() == [False, True, True, True]
    assert not (train & hold).any()


def test_split_rejects_a_holdout_share_outside_zero_one():
    with pytest.raises(ValueError, match="holdout_fraction"):
        time_split(np.arange(3.0), 1.0)


# --- window --------------------------------------------------------------------------

def test_relative_window_ends_at_the_newest_labelled_event_not_the_wall_clock():
    ts = np.array([1_700_000_000.0, 1_700_003_600.0, 1_700_007_200.0])  # simulated 2023 times
    mask, start, end = TrainingWindow.of({"last_hours": 1.5}).select(ts)
    assert mask.tolist() == [False, True, True] and end == ts[-1]


def test_window_from_iso_bounds_and_a_bad_window_is_refused():
    w = TrainingWindow.of(("2023-11-14T22:13:20Z", 1_700_000_100))
    assert w.start == 1_700_000_000.0 and w.end == 1_700_000_100.0
    with pytest.raises(ValueError, match="before its end"):
        TrainingWindow(start=5, end=5)
    with pytest.raises(ValueError, match="not a time"):
        TrainingWindow.of({"start": "yesterday"})


# --- metrics and the promotion rule ------------------------------------------------------

def test_metrics_of_a_one_class_holdout_have_no_auc_but_a_log_loss():
    m = evaluate(np.zeros(10), np.full(10, 0.1))
    assert math.isnan(m["auc"]) and m["log_loss"] == pytest.approx(-math.log(0.9))
    assert m["error_rate"] == 0.0


def test_candidate_within_the_margin_is_not_promoted_and_says_why():
    d = decide_promotion({"auc": 0.804, "log_loss": 0.1}, {"auc": 0.800, "log_loss": 0.1}, margin=0.005)
    assert d == Decision(False, d.reason, "auc", pytest.approx(0.004))
    assert "< margin 0.0050" in d.reason


def test_lower_is_better_metrics_compare_the_other_way():
    assert decide_promotion({"error_rate": 0.02}, {"error_rate": 0.05}, "error_rate", 0.01).promote
    assert not decide_promotion({"error_rate": 0.05}, {"error_rate": 0.02}, "error_rate", 0.0).promote


def test_undefined_auc_falls_back_to_log_loss():
    d = decide_promotion({"auc": math.nan, "log_loss": 0.10}, {"auc": math.nan, "log_loss": 0.20})
    assert d.promote and d.metric == "log_loss" and "auc undefined" in d.reason


def test_unknown_metric_is_refused_by_name():
    with pytest.raises(ValueError, match="'f1'"):
        RetrainConfig(metric="f1")


# --- idempotency -----------------------------------------------------------------------

def test_a_reason_trains_only_for_alerts_no_earlier_training_covered():
    assert unhandled(["a", "b"], {"a": "2", "b": "2"}) == []
    assert unhandled(["a", "b", "c"], {"a": "2"}) == ["b", "c"]


def test_requests_queued_together_merge_per_model():
    reqs = [RetrainRequest("r1", "fraud", ["a"]), RetrainRequest("r2", "other", ["x"]),
            RetrainRequest("r3", "fraud", ["a", "b"])]
    assert merge_requests(reqs) == {"fraud": (["a", "b"], ["r1", "r3"]), "other": (["x"], ["r2"])}


def test_alert_tags_are_valid_mlflow_tag_names_for_any_id():
    assert alert_tag("0123abcd") == "freshet.alert.0123abcd"
    odd = alert_tag("weird:id*with?chars")
    assert odd.startswith("freshet.alert.h") and odd == alert_tag("weird:id*with?chars")


def test_fingerprint_depends_on_rows_not_their_order():
    df = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": ["x", "y", "z"]})
    same = dataset_fingerprint(df.iloc[::-1], ["a", "b"])
    assert dataset_fingerprint(df, ["a", "b"]) == same
    assert dataset_fingerprint(df.assign(a=[1.0, 2.0, 4.0]), ["a", "b"]) != same


# --- labels --------------------------------------------------------------------------------

def test_label_rows_follow_the_contract():
    row = label_row(b'{"schema": "freshet.labels/1", "entities": {"card_id": "c1"}, "label": true, '
                    b'"ts": 1700000060000, "event_ts": "2023-11-14T22:13:20Z"}')
    assert row["label"] == 1.0 and row["ts"] == 1_700_000_060.0 and row["event_ts"] == 1_700_000_000.0
    assert json.loads(row["entities"]) == {"card_id": "c1"}
    with pytest.raises(ContractError, match="request_id"):
        label_row(b'{"schema": "freshet.labels/1", "label": 1, "ts": 1}')
    with pytest.raises(ContractError, match="schema"):
        label_row(b'{"schema": "freshet.drift/1", "label": 1, "ts": 1}')


def _labels(rows):
    df = pd.DataFrame(rows, columns=["request_id", "entities", "label", "event_ts"])
    df["event_ts"] = pd.to_datetime(df["event_ts"], unit="s", utc=True)
    return df


def test_labels_take_keys_time_and_request_fields_from_their_event():
    events = pd.DataFrame({"transaction_id": ["t1", "t2"], "card_id": ["c1", "c2"], "merchant_id": ["m1", "m2"],
                           "amount": [10.0, 20.0],
                           "event_ts": pd.to_datetime([100.0, 200.0], unit="s", utc=True)})
    labels = _labels([
        ("t2", None, 1.0, None),                                          # from the event
        ("t9", json.dumps({"card_id": "c9", "merchant_id": "m9"}), 0.0, 300.0),  # from the label itself
        ("t8", None, 0.0, None),                                          # neither: dropped
    ])
    out, counts = join_labels_to_events(labels, events, ["card_id", "merchant_id"], ["amount"])
    assert counts == {"from_events": 1, "from_labels": 1, "dropped": 1}
    assert out[["request_id", "card_id", "merchant_id", "event_ts"]].values.tolist() == [
        ["t2", "c2", "m2", 200.0], ["t9", "c9", "m9", 300.0]]
    assert out["amount"].iloc[0] == 20.0 and math.isnan(out["amount"].iloc[1])


# --- the pipeline ------------------------------------------------------------------------------

def test_fitted_pipeline_is_exportable_and_scores_like_sklearn_with_missing_values():
    from freshet.models import LinearModel, export_sklearn

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 3))
    X[:, 2] = np.nan  # a window with no events at all: still an input
    X[rng.random(400) < 0.1, 0] = np.nan
    y = (np.nan_to_num(X[:, 0]) + rng.normal(size=400) * 0.5 > 0).astype(int)
    pipe = fit_pipeline(X, y, seed=3)
    model = LinearModel.from_dict(export_sklearn(pipe, ["v:a", "v:b", "amount"]))
    np.testing.assert_allclose(model.predict_proba(X.tolist()), pipe.predict_proba(X)[:, 1], atol=1e-12)


def test_a_gain_the_holdout_cannot_tell_from_noise_is_not_promoted():
    rng = np.random.default_rng(4)
    n = 2000
    y = (rng.random(n) < 0.05).astype(float)
    signal = 1.0 * y
    a = 1 / (1 + np.exp(-(-3 + signal + rng.normal(0, 1, n))))  # two equally good models
    b = 1 / (1 + np.exp(-(-3 + signal + rng.normal(0, 1, n))))
    cand, champ = (a, b) if evaluate(y, a)["auc"] > evaluate(y, b)["auc"] else (b, a)
    gains = bootstrap_gains(y, cand, champ, ["auc"], rounds=60, seed=1)
    d = decide_promotion(evaluate(y, cand), evaluate(y, champ), "auc", margin=0.0, gains=gains)
    assert d.improvement > 0 and not d.promote and "not significant" in d.reason
    clear = bootstrap_gains(y, cand, np.full(n, 0.05), ["auc", "log_loss"], rounds=60, seed=1)
    assert np.quantile(clear["auc"], 0.05) > 0.1


@pytest.mark.parametrize("kwargs, names", [
    ({"since_request": True}, "since_request"),
    ({"wait_positives": -1}, "wait_positives"),
])
def test_a_retraining_config_that_cannot_work_fails_naming_the_setting(kwargs, names):
    with pytest.raises(ValueError, match=names):
        RetrainConfig(**kwargs)


def test_a_wait_counts_only_labels_of_events_after_its_cut_off():
    wait = LabelWait(since=100.0)
    wait.count([{"event_ts": 100.0, "label": 1.0}, {"event_ts": 100.5, "label": 1.0}, {"event_ts": 101.0, "label": 0.0}])
    wait.count([{"event_ts": 50.0, "label": 1.0}])  # a late label of an old event: the old regime
    assert (wait.labels, wait.positives) == (2, 1)
