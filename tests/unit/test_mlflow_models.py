"""A version is an MLflow model (sklearn flavour in skops, signature, input example) that freshet reads
without unpickling anything: a pickled model or a skops file holding untrusted types is refused."""

from __future__ import annotations

import operator

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from freshet.models import (
    LinearModel, UnsupportedModel, export_sklearn, read_mlflow_model, save_mlflow_model,
)
from freshet.training.pipeline import fit_pipeline

NAMES = ["card_txn_stats:sum_amount_300s", "merchant_txn_stats:count_amount_3600s", "amount"]


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * [40, 3, 20] + [100, 5, 50]
    y = (x[:, 0] + rng.normal(size=n) * 30 > 100).astype(int)
    x[rng.random(x.shape) < 0.05] = np.nan
    return x, y


def test_saved_model_has_skops_flavour_signature_and_example_and_pyfunc_scores_like_the_fast_scorer(tmp_path):
    import mlflow.pyfunc

    x, y = _data()
    pipe = fit_pipeline(x, y, seed=0, names=NAMES)
    save_mlflow_model(pipe, NAMES, tmp_path / "model", input_example=x[:3])
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "model.skops" in files and "input_example.json" in files and not any(f.endswith(".pkl") for f in files)
    meta = yaml.safe_load((tmp_path / "model" / "MLmodel").read_text())
    assert meta["flavors"]["sklearn"]["serialization_format"] == "skops"
    assert meta["flavors"]["python_function"]["predict_fn"] == "predict_proba"
    assert [c["name"] for c in yaml.safe_load(meta["signature"]["inputs"])] == NAMES

    loaded, names = read_mlflow_model(tmp_path / "model")
    assert names == NAMES
    fast = LinearModel.from_dict(export_sklearn(loaded, names))
    rows = [[None if np.isnan(v) else float(v) for v in r] for r in x[:50]]
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    scores = pyfunc.predict(pd.DataFrame(x[:50], columns=NAMES))[:, 1]
    np.testing.assert_allclose([fast.score_one(r) for r in rows], scores, rtol=1e-12)


def test_a_pickled_mlflow_model_is_refused_naming_skops_and_never_unpickled(tmp_path, monkeypatch):
    import pickle

    import mlflow.sklearn

    x, y = _data()
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(np.nan_to_num(x), y)
    mlflow.sklearn.save_model(pipe, str(tmp_path / "model"), serialization_format="pickle",
                              signature=False, pip_requirements=["scikit-learn"])

    def no_unpickling(*args, **kwargs):
        raise AssertionError("freshet unpickled a model")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(UnsupportedModel, match="never unpickles.*skops"):
        read_mlflow_model(tmp_path / "model", "model 'm' version 1")


def _untrusted_pipeline():
    """A pipeline whose skops file holds a callable skops does not trust (it could be any callable)."""
    return make_pipeline(FunctionTransformer(operator.methodcaller("copy")), LogisticRegression())


def test_a_pipeline_holding_types_freshet_does_not_trust_is_refused_before_it_is_saved(tmp_path):
    with pytest.raises(UnsupportedModel, match="operator.methodcaller"):
        save_mlflow_model(_untrusted_pipeline(), NAMES, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_skops_file_naming_extra_trusted_types_in_its_mlmodel_is_still_loaded_with_freshets_list(tmp_path):
    """The artifact's own skops_trusted_types are data from the registry, not a decision: ignored."""
    import skops.io as sio

    x, y = _data()
    save_mlflow_model(fit_pipeline(x, y, seed=0, names=NAMES), NAMES, tmp_path / "model")
    model_dir = tmp_path / "model"
    evil = _untrusted_pipeline()
    (model_dir / "model.skops").write_bytes(sio.dumps(evil))
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    meta["flavors"]["sklearn"]["skops_trusted_types"] = sio.get_untrusted_types(data=sio.dumps(evil))
    (model_dir / "MLmodel").write_text(yaml.safe_dump(meta))
    with pytest.raises(UnsupportedModel, match="does not load.*operator.methodcaller"):
        read_mlflow_model(model_dir)
