"""Training references of the versions the monitor sees, read from the model registry (MLflow).

Owns `RegistryReferences`: the callable `DriftMonitor(references=...)` asks on every version switch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from freshet.settings import Settings

log = logging.getLogger("freshet.monitor.references")


class RegistryReferences:
    """(model, version) -> the reference logged with that version, or None; cached per version.

    A version registered without one (or by another tool) gets None and the monitor warms up
    on its traffic instead. A registry that does not answer is asked three times, then the
    version is judged by warm-up too (and the log says so).
    """

    def __init__(self, settings: Settings, attempts: int = 3):
        self.settings = settings
        self.attempts = attempts
        self._registry = None
        self._cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    @property
    def registry(self):
        if self._registry is None:
            from freshet.models import ModelRegistry

            self._registry = ModelRegistry(self.settings, publish_events=False)
        return self._registry

    def __call__(self, model: str, version: str) -> dict[str, Any] | None:
        key = (model, str(version))
        if key not in self._cache:
            self._cache[key] = self._load(model, str(version))
        return self._cache[key]

    def _load(self, model: str, version: str) -> dict[str, Any] | None:
        from freshet.models import ModelNotFound

        for attempt in range(self.attempts):
            try:
                ref = self.registry.load_reference(model, version)
            except ModelNotFound as exc:
                log.warning("model %s version %s: %s; its traffic is judged against a warm-up reference",
                            model, version, exc)
                return None
            except Exception as exc:  # noqa: BLE001 - a busy registry: try again, then warm up
                if attempt + 1 < self.attempts:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                log.warning("could not read the training reference of %s version %s (%s); its traffic is judged "
                            "against a warm-up reference", model, version, exc)
                return None
            if ref is None:
                log.info("model %s version %s carries no training reference: warming up on its traffic", model, version)
            else:
                log.info("model %s version %s: judged against its training reference (%s rows)", model, version,
                         ref.get("rows"))
            return ref
        return None
