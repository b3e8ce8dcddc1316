"""A model is served from plain JSON numbers and scores exactly as the scikit-learn pipeline did."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from freshet import models
from freshet.models import LinearModel, UnsupportedModel, export_sklearn


def _data(n=400, d=6, seed=0, nan_share=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 50, size=d) + rng.uniform(-20, 20, size=d)
    y = (x[:, 0] / x[:, 0].std() + rng.normal(size=n) > 0).astype(int)
    if nan_share:
        x[rng.random(x.shape) < nan_share] = np.nan
    return x, y


@pytest.mark.parametrize("make", [
    lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.5)),
    lambda: make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression()),
    lambda: make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000)),
    lambda: LogisticRegression(max_iter=1000),
    lambda: make_pipeline(StandardScaler(with_mean=False), LogisticRegression()),
])
def test_exported_model_scores_equal_sklearn_predict_proba(make):
    nan = "SimpleImputer" in repr(make())
    x, y = _data(nan_share=0.1 if nan else 0.0)
    pipe = make().fit(x, y)
    doc = json.loads(json.dumps(export_sklearn(pipe, [f"f{i}" for i in range(x.shape[1])])))
    model = LinearModel.from_dict(doc)
    rows = [[None if np.isnan(v) else float(v) for v in r] for r in x]
    np.testing.assert_allclose(model.predict_proba(rows), pipe.predict_proba(x)[:, 1], rtol=1e-12, atol=1e-15)
    assert [model.label(p) for p in model.predict_proba(rows)] == list(pipe.predict(x))
    one = [model.score_one(r) for r in rows]
    np.testing.assert_allclose(one, pipe.predict_proba(x)[:, 1], rtol=1e-12, atol=1e-15)


def test_missing_inputs_without_an_imputer_are_filled_with_the_training_mean():
    x, y = _data()
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    model = LinearModel.from_dict(export_sklearn(pipe, [f"f{i}" for i in range(6)]))
    row = [None, *x[0, 1:]]
    filled = np.array([[pipe[0].mean_[0], *x[0, 1:]]])
    assert model.score_one(row) == pytest.approx(pipe.predict_proba(filled)[0, 1], rel=1e-12)


def test_unsupported_steps_and_shapes_are_refused_naming_them():
    x, y = _data()
    with pytest.raises(UnsupportedModel, match="MinMaxScaler"):
        export_sklearn(make_pipeline(MinMaxScaler(), LogisticRegression()).fit(x, y), [f"f{i}" for i in range(6)])
    with pytest.raises(UnsupportedModel, match="6 features"):
        export_sklearn(LogisticRegression().fit(x, y), ["a"])
    with pytest.raises(UnsupportedModel, match="binary"):
        export_sklearn(LogisticRegression().fit(x, y % 3 + (x[:, 1] > 0)), [f"f{i}" for i in range(6)])
    with pytest.raises(UnsupportedModel, match="format"):
        LinearModel.from_dict({"format": "pickle"})


def test_the_format_holds_numbers_only():
    x, y = _data()
    doc = export_sklearn(make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y), [f"f{i}" for i in range(6)])
    text = json.dumps(doc)
    assert json.loads(text) == doc
    assert set(doc) == {"format", "feature_names", "fill", "mean", "scale", "coef", "intercept", "classes",
                        "threshold"}


def test_module_examples_run():
    failures, _ = doctest.testmod(models)
    assert failures == 0
