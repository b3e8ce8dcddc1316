"""Reproducing a registered version: its training set rebuilt from its snapshot, refitted and compared.

Owns `reproduce`, what `freshet retrain --reproduce NAME/VERSION` runs.

The snapshot logged with the version names the part files, the label log positions, the
feature definitions and the fit's settings and seed; rebuilding from it must give the same
examples (the dataset fingerprint), the same parameters and the same scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from freshet.features import FeatureRegistry
from freshet.settings import Settings
from freshet.training.retrain import RetrainConfig, Retrainer
from freshet.training.snapshot import Snapshot

PARAMETERS = ("fill", "mean", "scale", "coef", "intercept")


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b), initial=0.0))


def compare(registered: dict[str, Any], rebuilt: dict[str, Any], X: np.ndarray) -> dict[str, Any]:
    """How far two exported models (`freshet.models.export_sklearn`) are apart: per parameter and in scores on X.

    >>> m = {"format": "freshet.linear-classifier/1", "feature_names": ["a"], "fill": [0.0], "mean": [0.0],
    ...      "scale": [1.0], "coef": [2.0], "intercept": 0.5, "classes": [0, 1]}
    >>> compare(m, {**m, "coef": [2.5]}, np.array([[1.0]]))["parameters"]["coef"]
    0.5
    """
    from freshet.models import LinearModel

    diffs = {k: _max_diff(registered[k], rebuilt[k]) for k in PARAMETERS}
    same_inputs = registered["feature_names"] == rebuilt["feature_names"]
    p_registered = LinearModel.from_dict(registered).predict_proba(X.tolist()) if len(X) else np.zeros(0)
    p_rebuilt = LinearModel.from_dict(rebuilt).predict_proba(X.tolist()) if len(X) and same_inputs else None
    return {"inputs_equal": same_inputs, "parameters": diffs,
            "scores": _max_diff(p_registered, p_rebuilt) if p_rebuilt is not None else float("inf"),
            "scored_rows": len(X)}


def reproduce(settings: Settings, name: str, version: str, registry: FeatureRegistry | None = None,
              models: Any = None) -> dict[str, Any]:
    """Rebuild version `version` of model `name` from its snapshot and compare; returns the report.

    `status` is "identical" (same examples, bit-identical parameters and scores), "equivalent"
    (same examples, parameters within 1e-9: another BLAS, say) or "different"."""
    from freshet.models import ModelRegistry, export_sklearn

    models = models or ModelRegistry(settings, publish_events=False)
    snapshot = Snapshot.from_dict(models.training_snapshot(name, version))
    settings = dataclasses.replace(settings, training_features=snapshot.training_features)
    trainer = Retrainer(settings, registry, RetrainConfig.from_snapshot({**snapshot.config, "model": name}), models)
    training, pipeline = trainer.rebuild(snapshot)
    registered, names = models.load_pipeline(name, version)
    mv = models.client.get_model_version(name, str(version))
    recorded = mv.tags.get("freshet.dataset_fingerprint", "")
    rebuilt = training.fingerprint()
    diff = compare(export_sklearn(registered, names), export_sklearn(pipeline, training.inputs),
                   training.X[training.judged])
    worst = max([*diff["parameters"].values(), diff["scores"]])
    same_data = recorded == rebuilt and diff["inputs_equal"]
    status = "identical" if same_data and worst == 0 else "equivalent" if same_data and worst <= 1e-9 else "different"
    return {"model": name, "version": str(version), "status": status, "snapshot": snapshot.digest,
            "dataset_fingerprint": {"recorded": recorded, "rebuilt": rebuilt, "equal": recorded == rebuilt},
            "rows": training.rows(), "max_difference": diff["parameters"] | {"scores": diff["scores"]},
            "scored_rows": diff["scored_rows"], "seed": snapshot.seed, "code": snapshot.code}
