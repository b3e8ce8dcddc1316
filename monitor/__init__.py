"""River drift monitor: drift alerts on features, scores and outcomes, usable without Kafka.

`DriftMonitor` is the entry point; the rest is exported for tests, benches and the service.
Names load on first use: importing River takes seconds, and the CLI or the alert reader
should not pay for it unless they use the detectors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ModelConfig": "config",
    "MonitorConfig": "config",
    "ERROR_DETECTORS": "detectors",
    "NUMERIC_DETECTORS": "detectors",
    "ConfigError": "detectors",
    "ErrorRateDetector": "detectors",
    "FrequencyShift": "detectors",
    "MeanShiftDetector": "detectors",
    "RateRule": "detectors",
    "StandardScores": "detectors",
    "STATE_FORMAT": "drift",
    "DriftMonitor": "drift",
    "ExpectedErrorEstimate": "estimate",
    "LabelJoin": "labels",
    "Outcome": "labels",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import ModelConfig, MonitorConfig
    from .detectors import (
        ERROR_DETECTORS,
        NUMERIC_DETECTORS,
        ConfigError,
        ErrorRateDetector,
        FrequencyShift,
        MeanShiftDetector,
        RateRule,
        StandardScores,
    )
    from .drift import STATE_FORMAT, DriftMonitor
    from .estimate import ExpectedErrorEstimate
    from .labels import LabelJoin, Outcome


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
