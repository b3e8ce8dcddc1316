"""`freshet retrain --folds N`: a post-alert retraining judged out-of-fold over time blocks, fitted on every row."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from freshet.settings import load_settings
from freshet.training.dataset import TrainingSet, blocked_folds
from freshet.training.evaluation import Champion, out_of_fold
from freshet.training.retrain import RetrainConfig, Retrainer, Retraining

INPUTS = ["v:a", "v:b", "amount"]


def _rows(n: int = 600, seed: int = 0, positives_after: float | None = None) -> pd.DataFrame:
    """Labelled rows, oldest first, whose label depends on the inputs; with `positives_after`, no
    positive before that share of the rows (a fraud pattern that starts late)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(0, 0.7, n) > 1.6).astype(float)
    if positives_after is not None:
        y[: int(n * positives_after)] = 0.0
    t = np.sort(rng.integers(0, n // 2, n)).astype(float)  # pairs of rows share an instant
    return pd.DataFrame({"v__a": X[:, 0], "v__b": X[:, 1], "amount": X[:, 2], "label": y, "_t": t,
                         "request_id": [f"r{i}" for i in range(n)]})


def test_blocks_cover_every_row_once_in_time_order_and_never_cut_an_instant():
    ts = np.random.default_rng(1).permutation(np.repeat(np.arange(250.0), 4))  # 1,000 rows, 4 per instant
    folds = blocked_folds(ts, 5)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]
    assert np.bincount(folds).sum() == len(ts)  # each row in exactly one block
    for k in range(4):
        assert ts[folds == k].max() < ts[folds == k + 1].min()  # contiguous spans, oldest first
    assert all(196 <= c <= 204 for c in np.bincount(folds)), np.bincount(folds)


def test_a_training_set_cut_into_folds_fits_on_every_row_and_holds_none_out():
    data = _rows()
    training = TrainingSet.split(data, INPUTS, 0.2, n_folds=5, min_class_rows=10)
    assert training.n_folds == 5 and training.folds_skipped == ""
    assert training.train.all() and not training.holdout.any() and training.judged.all()
    rows = training.rows()
    assert rows["train"] == len(data) and rows["holdout"] == 0 and rows["folds"] == 5


def test_a_fold_with_too_few_of_a_class_falls_back_to_the_newest_share_and_says_why():
    data = _rows(positives_after=0.75)  # every positive in the newest quarter: the fold holding it out has none
    training = TrainingSet.split(data, INPUTS, 0.2, n_folds=5, min_class_rows=10)
    assert training.folds is None and training.n_folds == 0
    assert "fold 5 of 5" in training.folds_skipped and "need 10 of each" in training.folds_skipped
    newest = data["_t"].to_numpy() >= np.sort(data["_t"].to_numpy())[len(data) - 120]
    assert (training.holdout == newest).all() and (training.judged == training.holdout).all()


def test_each_block_is_scored_by_a_model_fitted_on_the_other_blocks():
    training = TrainingSet.split(_rows(), INPUTS, 0.2, n_folds=4, min_class_rows=10)
    fitted_on = []

    def fit(rows):
        fitted_on.append(rows.copy())
        k = len(fitted_on) - 1
        return SimpleNamespace(predict_proba=lambda X: np.full(len(X), k / 10))

    p = out_of_fold(training, fit)
    assert len(fitted_on) == 4
    for k, rows in enumerate(fitted_on):
        assert (rows == (training.folds != k)).all()  # never its own block
        assert np.allclose(p[training.folds == k], k / 10)
    assert np.isfinite(p).all()


@pytest.fixture
def retrainer(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    settings = load_settings(env, data_dir=str(tmp_path / "data"))
    cfg = RetrainConfig(since_request=True, wait_labels=100, folds=5, seed=2)
    return Retrainer(settings, registry=SimpleNamespace(), config=cfg, models=SimpleNamespace())


def test_judged_out_of_fold_the_version_fits_every_row_and_its_miss_rate_reference_is_out_of_fold(retrainer):
    training = TrainingSet.split(_rows(), INPUTS, 0.2, n_folds=5, min_class_rows=10)
    job = Retraining.start(retrainer.config, ["alert-1"], ["req-1"], False)
    job.outcome["window"] = {}
    pipeline = retrainer._fit(job, training)
    assert pipeline.named_steps["scale"].n_samples_seen_ == len(training.y)  # the version: every row

    scores = retrainer._evaluate(job, training, pipeline, SimpleNamespace(), Champion(None))
    assert len(scores.y) == len(training.y)
    in_sample = pipeline.predict_proba(pd.DataFrame(training.X, columns=INPUTS))[:, 1]
    assert not np.allclose(scores.p_candidate, in_sample)  # each row scored by a fit that did not see it

    retrainer._reference(job, training, pipeline, SimpleNamespace(views=[]), scores)
    outcomes = job.outcome["reference"]["outcomes"]
    positives = training.y == 1
    assert outcomes["positives"] == positives.sum()
    assert outcomes["missed"] == int((scores.p_candidate[positives] <= 0.5).sum())


def test_folds_are_recorded_in_the_snapshot_so_a_rebuild_fits_the_same_rows():
    cfg = RetrainConfig(since_request=True, wait_labels=100, folds=5)
    assert cfg.snapshot()["folds"] == 5 and cfg.params()["folds"] == 5
    assert RetrainConfig.from_snapshot(cfg.snapshot()).folds == 5
    assert RetrainConfig.from_snapshot({"seed": 1}).folds == 0  # a snapshot from before --folds


@pytest.mark.parametrize("kwargs", [{"folds": 5}, {"folds": 1, "since_request": True, "wait_labels": 10}])
def test_folds_without_since_request_or_fewer_than_two_fail_naming_both_flags(kwargs):
    with pytest.raises(ValueError, match=r"--folds.*--since-request"):
        RetrainConfig(**kwargs)


def test_the_cli_refuses_folds_without_since_request_before_anything_starts(tmp_path, monkeypatch, capsys):
    from freshet.cli import main

    for k in [k for k in os.environ if k.startswith("FRESHET_")]:
        monkeypatch.delenv(k)
    assert main(["--data-dir", str(tmp_path), "retrain", "--once", "--folds", "5"]) == 2
    err = capsys.readouterr().err
    assert "--folds" in err and "--since-request" in err
