"""What the drift monitor watches for each model, and how strictly: `ModelConfig`, `MonitorConfig`.

Settings are checked when built, so a bad config fails at start with a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .detectors import ERROR_DETECTORS, NUMERIC_DETECTORS, ConfigError, StandardScores, check_detector


@dataclass
class ModelConfig:
    """What to watch for one model, and how strictly.

    The defaults meet the targets bench/drift.py measures: under one false alert per 100,000
    predictions over 20 features, a 1 sd shift in one of them found in about 60 predictions.
    """

    model: str
    numeric_features: Sequence[str] = ()
    categorical_features: Sequence[str] = ()
    # detectors: "adwin" | "page_hinkley" | "kswin" on numeric features and the score;
    # "adwin" | "hddm_a" | "hddm_w" | "ddm" | "eddm" | "fhddm" on labelled outcomes
    feature_detector: str = "adwin"
    score_detector: str = "adwin"
    error_detector: str = "adwin"
    # family-wise significance for feature, prediction and categorical drift, split
    # evenly (Bonferroni) over the watched streams
    alpha: float = 1e-3
    # same for the two performance tests (labelled error rate and the label-free estimate)
    performance_alpha: float = 2e-3
    warmup: int = 2000              # predictions forming the reference window
    label_warmup: int = 1000        # labelled outcomes forming the reference error rate
    # labelled positives (label 1) forming the reference miss rate (positives predicted 0); 0 = not
    # watched. On a rare class the error rate is mostly the other class's: a model that stops
    # catching positives altogether can keep its error rate while its miss rate goes to 1
    miss_warmup: int = 50
    block_size: int = 16            # predictions averaged into one detector update
    batch_blocks: int = 3           # blocks judged together (numpy work per call is amortised;
                                    # an alert can come out up to block_size * (batch_blocks - 1) later)
    cooldown: int = 5000            # observations before one (kind, subject, detector) alerts again
    standardise: str = "quantile"   # "quantile" (normal scores) or "zscore"
    watch_score: bool = True
    join_labels: bool = True        # False for a model that never gets labels: nothing waits for them
    decision_threshold: float = 0.5
    category_window: int = 1000
    max_categories: int = 30
    quality_window: int = 1000
    missing_margin: float = 0.05
    out_of_range_margin: float = 0.1   # bounds = reference [min, max] widened by this share of the range
    out_of_range_rate: float = 0.01
    unseen_margin: float = 0.05
    deadletter_rate: float = 0.01
    estimate: bool = True           # the label-free estimate; needs scores in [0, 1] (classifiers)
    estimate_window: int = 500
    estimate_min_increase: float = 0.02
    calibration_labels: int = 2000
    rewarm_on_new_version: bool = True
    # windowed features: name -> window seconds. Without a training reference that says its
    # window was full, such a feature is not judged (nor sampled for a reference) until its
    # window has had `window` seconds of history: from `history_start` (epoch seconds, when
    # the stream's history begins) or else from the model's first prediction
    windows: Mapping[str, float] = dataclasses.field(default_factory=dict)
    history_start: float | None = None
    use_training_reference: bool = True   # judge a version against the reference logged with it
    # against a training reference, a numeric stream alerts only when its level after the change is
    # at least this many reference standard deviations away: serving never sees exactly the training
    # distribution (features read a little later than the event they score, rounding), and an
    # offset that small from the first prediction on is skew to know about, not drift to act on
    reference_tolerance: float = 0.3

    def __post_init__(self) -> None:
        self.numeric_features = tuple(self.numeric_features)
        self.categorical_features = tuple(self.categorical_features)
        self.windows = {str(k): float(v) for k, v in dict(self.windows or {}).items()}
        self.validate()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown monitor setting(s) {', '.join(map(repr, unknown))} for model "
                              f"{data.get('model', '?')!r}; known: {', '.join(sorted(known))}")
        if "model" not in data:
            raise ConfigError("a model's monitor config needs 'model'")
        return cls(**data)

    def validate(self) -> None:
        where = f"model {self.model!r}"
        self.feature_detector = check_detector(self.feature_detector, NUMERIC_DETECTORS, f"numeric features of {where}")
        self.score_detector = check_detector(self.score_detector, NUMERIC_DETECTORS, f"the score of {where}")
        self.error_detector = check_detector(self.error_detector, ERROR_DETECTORS, f"labelled outcomes of {where}")
        names = list(self.numeric_features) + list(self.categorical_features)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{where}: feature(s) {', '.join(map(repr, dupes))} listed twice")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: feature names must be non-empty strings, got {name!r}")
        for name in ("alpha", "performance_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("warmup", "label_warmup", "block_size", "batch_blocks", "category_window", "quality_window",
                     "estimate_window", "max_categories"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {getattr(self, name)}")
        if self.warmup < 2 * self.block_size:
            raise ConfigError(f"{where}: warmup ({self.warmup}) must be at least two blocks ({2 * self.block_size})")
        if self.miss_warmup < 0:
            raise ConfigError(f"{where}: miss_warmup must be >= 0 (0 = miss rate not watched), got {self.miss_warmup}")
        if self.cooldown < 0:
            raise ConfigError(f"{where}: cooldown must be >= 0, got {self.cooldown}")
        if not 0 < self.decision_threshold < 1:
            raise ConfigError(f"{where}: decision_threshold must be in (0, 1), got {self.decision_threshold}")
        StandardScores(self.standardise)  # raises naming an unknown standardisation
        if not self.reference_tolerance >= 0:
            raise ConfigError(f"{where}: reference_tolerance must be >= 0, got {self.reference_tolerance}")
        for name, w in self.windows.items():
            if not w > 0:
                raise ConfigError(f"{where}: windows[{name!r}] must be > 0 seconds, got {w}")

    @property
    def drift_streams(self) -> int:
        return len(self.numeric_features) + len(self.categorical_features) + (1 if self.watch_score else 0)


@dataclass
class MonitorConfig:
    """Every watched model plus the label join shared by all of them."""

    models: Sequence[ModelConfig] = ()
    seed: int = 0
    label_wait_s: float = 3600.0
    max_pending_labels: int = 200_000
    label_entity_keys: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.models = tuple(m if isinstance(m, ModelConfig) else ModelConfig.from_dict(m) for m in self.models)
        names = [m.model for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"model(s) {', '.join(map(repr, dupes))} configured twice")
        if self.label_wait_s <= 0:
            raise ConfigError(f"label_wait_s must be > 0, got {self.label_wait_s}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MonitorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown monitor setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
        return cls(**data)
