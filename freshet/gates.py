"""The model gate: whether a registered version may be promoted or served, and why not.

Owns the checks (finite parameters, inputs the feature registry serves, a smoke score of a
reference batch inside [0, 1]) and recording a verdict on the version in the model registry.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Collection, Mapping

import numpy as np

log = logging.getLogger("freshet.gates")

VERDICT_TAG = "freshet.gate"  # on the model version: "passed" or "rejected: <reason>"
PASSED = "passed"


class GateFailed(ValueError):
    """A version that must not be served; the message says why."""


class ModelGate:
    """Checks a model version against the feature registry it will read from.

    `services` maps each feature service to its "view:feature" refs; a version whose
    lineage names a service must read only that service's features, any other only
    features some service (or view) serves, in `known`.

    >>> from freshet.models import FORMAT, LinearModel
    >>> gate = ModelGate({"svc": ["v:a"]}, known=["v:a"])
    >>> good = LinearModel.from_dict({"format": FORMAT, "feature_names": ["v:a", "amount"], "fill": [0, 0],
    ...     "mean": [0, 0], "scale": [1, 1], "coef": [1, 1], "intercept": 0, "classes": [0, 1]})
    >>> gate.check(good, "svc")
    >>> bad = LinearModel.from_dict({"format": FORMAT, "feature_names": ["v:a"], "fill": [0], "mean": [0],
    ...     "scale": [0.0], "coef": [1], "intercept": 0, "classes": [0, 1]})
    >>> gate.check(bad, "svc")
    Traceback (most recent call last):
    ...
    freshet.gates.GateFailed: scale must be finite and above 0 for every input; 'v:a' has 0.0
    """

    def __init__(self, services: Mapping[str, Collection[str]], known: Collection[str] = ()):
        self.services = {name: frozenset(refs) for name, refs in services.items()}
        self.known = frozenset(known).union(*self.services.values()) if self.services else frozenset(known)

    def check(self, model: Any, feature_service: str = "") -> None:
        """Raise GateFailed naming the first problem of `model` (a freshet.models.LinearModel)."""
        finite_parameters(model)
        self.inputs_served(model, feature_service)
        smoke_score(model)

    def inputs_served(self, model: Any, feature_service: str) -> None:
        refs = [f for f in model.feature_names if ":" in f]
        if feature_service:
            if feature_service not in self.services:
                raise GateFailed(f"its feature service {feature_service!r} is not in the feature registry; "
                                 f"known: {', '.join(sorted(self.services)) or 'none'}")
            allowed, where = self.services[feature_service], f"feature service {feature_service!r}"
        else:
            allowed, where = self.known, "the feature registry"
        missing = [r for r in refs if r not in allowed]
        if missing:
            raise GateFailed(f"it reads {len(missing)} feature(s) {where} does not serve: {', '.join(missing[:5])}")


def finite_parameters(model: Any) -> None:
    """Every parameter a finite number, and every scale above 0 (a zero scale divides by zero)."""
    for name in ("fill", "mean", "scale", "coef"):
        values = np.asarray(getattr(model, name), dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            raise GateFailed(f"{name} must be finite; {model.feature_names[i]!r} has {values[i]}")
    scale = np.asarray(model.scale, dtype=float)
    if (scale <= 0).any():
        i = int(np.argmax(scale <= 0))
        raise GateFailed(f"scale must be finite and above 0 for every input; {model.feature_names[i]!r} "
                         f"has {scale[i]}")
    if not math.isfinite(model.intercept):
        raise GateFailed(f"intercept must be finite, got {model.intercept}")


def reference_batch(model: Any) -> list[list[Any]]:
    """Rows around what the version was trained on: its fill values, its means, +-3 scales, all missing."""
    mean, scale = np.asarray(model.mean, dtype=float), np.asarray(model.scale, dtype=float)
    rows = [list(map(float, model.fill)), mean.tolist(), (mean + 3 * scale).tolist(), (mean - 3 * scale).tolist(),
            [None] * len(model.feature_names)]
    return rows


def smoke_score(model: Any) -> None:
    """Score the reference batch both ways serving does; every score must lie in [0, 1]."""
    rows = reference_batch(model)
    with np.errstate(all="ignore"):
        try:
            scores = [*np.asarray(model.predict_proba(rows), dtype=float).tolist(),
                      *(model.score_one(r) for r in rows)]
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise GateFailed(f"scoring a reference batch failed: {exc}") from None
    bad = [s for s in scores if not (isinstance(s, float) and 0.0 <= s <= 1.0)]
    if bad:
        raise GateFailed(f"scoring a reference batch gave {len(bad)} score(s) outside [0, 1]: {bad[:3]}")


def registry_gate(registry: Any) -> ModelGate:
    """The gate for a feature registry (a `freshet.features.FeatureRegistry`): what the retrainer and
    `freshet models promote` check a version against."""
    known = [f"{v.name}:{f}" for v in registry.views.values() for f in v.feature_names]
    return ModelGate(registry.feature_services, known)


def check_version(models: Any, registry: Any, name: str, version: str, feature_service: str | None = None) -> str:
    """Why the gate rejects `version` of `name` ("" when it passes), recorded on the version.

    `models` is a `freshet.models.ModelRegistry`; `feature_service` defaults to the version's own."""
    model = models.load(name, version)
    service = model.info.get("feature_service", "") if feature_service is None else feature_service
    try:
        registry_gate(registry).check(model, service)
        reason = ""
    except GateFailed as exc:
        reason = str(exc)
    record_verdict(models, name, version, reason)
    return reason


def record_verdict(models: Any, name: str, version: str, reason: str = "") -> None:
    """Tag the version with the gate's verdict (`reason` empty: passed); never raises."""
    value = PASSED if not reason else f"rejected: {reason}"[:4900]
    try:
        models.client.set_model_version_tag(name, str(version), VERDICT_TAG, value)
    except Exception as exc:  # noqa: BLE001 - the log still says it; the registry may be down
        log.warning("could not record the gate verdict of %s version %s: %s", name, version, exc)
