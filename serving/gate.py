"""The model gate as serving applies it: before a promotion it is asked for, and before every swap.

Owns checking a version against the feature registry this server reads, logging a rejection
once per version and recording each verdict on the version in the model registry.
"""

from __future__ import annotations

import logging
from typing import Any

from freshet.gates import PASSED, GateFailed, ModelGate, record_verdict
from freshet.serving.online import OnlineFeatureReader

log = logging.getLogger("freshet.serving.gate")


class ServingGate:
    """Callable on a LinearModel: returns when it may be served, raises GateFailed naming why not."""

    def __init__(self, reader: OnlineFeatureReader, models: Any = None):
        self.reader = reader
        self.models = models  # a freshet.models.ModelRegistry, to record verdicts on (None: log only)
        self._verdicts: dict[tuple[str, str], str] = {}

    def _gate(self) -> ModelGate:
        reg = self.reader.registry
        services = {name: [f"{view}:{feature}" for view, feature, _ in triples]
                    for name, triples in reg.feature_services.items()}
        known = [f"{view.name}:{feature}" for view in reg.views.values() for feature in view.features]
        return ModelGate(services, known)

    def __call__(self, model: Any) -> None:
        key = (model.name, str(model.version))
        try:
            self._gate().check(model, model.info.get("feature_service", ""))
            verdict = PASSED
        except GateFailed as exc:
            verdict = str(exc)
        if self._verdicts.get(key) != verdict:  # a verdict is logged and recorded once per version
            self._verdicts[key] = verdict
            if verdict != PASSED:
                log.error("model %s version %s failed the model gate and is not served: %s", *key, verdict)
            if self.models is not None:
                record_verdict(self.models, *key, "" if verdict == PASSED else verdict)
        if verdict != PASSED:
            raise GateFailed(f"version {key[1]} failed the model gate: {verdict}")
