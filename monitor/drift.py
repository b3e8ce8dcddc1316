"""The drift monitor: predictions and labels in, few and precise `DriftAlert`s out.

Owns the per-model configuration, the reference (warm-up) window, block accumulation of
predictions, alert budgets (Bonferroni split, cooldown, de-duplication) and restart state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter, deque
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from freshet.contracts import ContractError, DriftAlert, Label, Prediction

from .detectors import (
    ERROR_DETECTORS,
    NUMERIC_DETECTORS,
    ConfigError,
    ErrorRateDetector,
    FrequencyShift,
    MeanShiftDetector,
    RateRule,
    StandardScores,
    check_detector,
    rewarm,
)
from .estimate import ExpectedErrorEstimate
from .labels import LabelJoin, Outcome

STATE_FORMAT = "freshet.monitor.state/1"
_TS_TYPES = (float, int)
_RECENT_BLOCKS = 128   # block statistics kept per column (restart summaries)
_SHIFT_BLOCKS = 4      # of which the newest few give an alert's statistic


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

    def __post_init__(self) -> None:
        self.numeric_features = tuple(self.numeric_features)
        self.categorical_features = tuple(self.categorical_features)
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
        if self.cooldown < 0:
            raise ConfigError(f"{where}: cooldown must be >= 0, got {self.cooldown}")
        if not 0 < self.decision_threshold < 1:
            raise ConfigError(f"{where}: decision_threshold must be in (0, 1), got {self.decision_threshold}")
        StandardScores(self.standardise)  # raises naming an unknown standardisation

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


# ---------------------------------------------------------------------------------------
# Watches: one per group of streams of a model, each with its own warm-up.

@dataclass(slots=True)
class _Signal:
    """An alert a watch would raise, before cooldown and de-duplication."""

    kind: str
    subject: str
    detector: str
    statistic: float
    threshold: float
    window: int


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


class NumericWatch:
    """A model's numeric columns (features, and the score): reference, block detectors, quality rules.

    Columns warm up on their own clocks, so a new model version re-learns the score's
    reference while the features keep theirs.
    """

    def __init__(self, names: Sequence[str], kinds: Sequence[str], detectors: Sequence[str], delta: float,
                 config: ModelConfig, seed: int):
        self.names = tuple(names)
        self.kinds = tuple(kinds)
        self.detector_names = tuple(detectors)
        self.delta = delta
        self.config = config
        self.seed = seed
        F = len(self.names)
        self.scores = StandardScores(config.standardise)
        self.ready = np.zeros(F, dtype=bool)
        self.detectors: list[MeanShiftDetector | None] = [None] * F
        # blocks since each detector last fired, and the last block statistics: alert
        # statistics, and what a restart re-warms a fresh detector with
        self.since = np.zeros(F)
        self.recent = np.zeros((_RECENT_BLOCKS, F))
        self._ri = 0
        self._inv_sqrt = 1 / np.sqrt(np.maximum(np.arange(config.block_size + 1), 1))
        self._q_missing = np.zeros(F)
        self._q_blocks: list[np.ndarray] = []
        self._q_n = 0
        self.lo = np.full(F, -np.inf)
        self.hi = np.full(F, np.inf)
        # one rule over 2F subjects: missing rate per column, then out-of-range rate per column
        self.rules = RateRule(np.zeros(2 * F), 1, [config.missing_margin] * F + [config.out_of_range_rate] * F,
                              config.quality_window, z=[5.0] * F + [0.0] * F)
        self._warming = np.arange(F)
        self._warm: list[np.ndarray] = []
        self._warm_n = 0

    def reset_columns(self, columns: Sequence[int]) -> None:
        """Forget these columns' reference; they warm up again from the next block."""
        columns = list(columns)
        self.ready[columns] = False
        for j in columns:
            self.detectors[j] = None
        self.since[columns] = 0
        self.recent[:, columns] = 0.0
        self._warming = np.union1d(self._warming, columns).astype(int)
        self._warm, self._warm_n = [], 0

    def update(self, X: np.ndarray) -> list[_Signal]:
        live = self.ready & self.scores.usable if self.scores.fitted else self.ready.copy()
        if len(self._warming):
            self._warm.append(X[:, self._warming])
            self._warm_n += len(X)
            if self._warm_n >= self.config.warmup:
                self._fit(np.vstack(self._warm), self._warming)
                self._warming, self._warm, self._warm_n = np.arange(0), [], 0
        if not live.any():
            return []
        return self._observe(X, live, quiet=False)

    def _fit(self, R: np.ndarray, columns: np.ndarray) -> None:
        cfg = self.config
        F = len(self.names)
        cols = columns.tolist()
        self.scores.fit(R, columns=cols, width=F)
        finite = np.isfinite(R)
        with np.errstate(invalid="ignore"):
            lo = np.where(finite, R, np.inf).min(0)
            hi = np.where(finite, R, -np.inf).max(0)
        span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
        self.lo[cols] = np.where(np.isfinite(lo), lo - cfg.out_of_range_margin * span, -np.inf)
        self.hi[cols] = np.where(np.isfinite(hi), hi + cfg.out_of_range_margin * span, np.inf)
        n = len(R)
        # the reference has nothing out of its own (widened) bounds by construction
        self.rules.reference[cols] = 1 - finite.mean(0)
        self.rules.reference[[F + j for j in cols]] = 0.0
        self.rules.reference_size = max(self.rules.reference_size, n)
        for j in cols:
            self.detectors[j] = MeanShiftDetector(self.detector_names[j], self.delta, seed=self.seed + j)
        self.ready[cols] = True
        # the reference itself fills the new detectors' windows, quietly
        only = np.zeros(F, dtype=bool)
        only[cols] = True
        only &= self.scores.usable
        full = np.full((n, F), np.nan)
        full[:, cols] = R
        self._observe(full, only, quiet=True)

    def _observe(self, X: np.ndarray, live: np.ndarray, quiet: bool) -> list[_Signal]:
        """Judge X, any number of rows: one detector update per column per block of rows."""
        n = len(X)
        b = self.config.block_size
        miss = np.isnan(X)
        Z = self.scores.transform_unmasked(X)
        Z[miss] = 0.0
        if n % b == 0:
            sums = Z.reshape(n // b, b, -1).sum(1)
            counts = b - miss.reshape(n // b, b, -1).sum(1)
        else:
            starts = np.arange(0, n, b)
            sums = np.add.reduceat(Z, starts, axis=0)
            counts = np.add.reduceat(~miss, starts, axis=0, dtype=np.intp)
        has = counts > 0
        has &= live
        # the block statistic: sum / sqrt(count) is N(0, 1) while nothing changes
        y = sums * self._inv_sqrt[counts]
        y *= has
        k = len(y)
        self.recent[(self._ri + np.arange(k)) % _RECENT_BLOCKS] = y
        self._ri += k
        self.since += has.sum(0)
        detectors = self.detectors
        fired = []
        if k == 1:
            ys = y[0].tolist()
            fired = [(j, 0) for j in np.flatnonzero(has[0]).tolist() if detectors[j].update(ys[j])]
        else:
            ys, hs = y.T.tolist(), has.T.tolist()
            for j in np.flatnonzero(has.any(0)).tolist():
                update = detectors[j].update
                rows = [r for r, (v, h) in enumerate(zip(ys[j], hs[j])) if h and update(v)]
                if rows:
                    fired.append((j, rows[-1]))
        if quiet:
            return []
        signals: list[_Signal] = []
        if fired:
            shift = self.recent_shift()
            for j, row in fired:
                signals.append(_Signal(self.kinds[j], self.names[j], self.detector_names[j], _finite(shift[j]),
                                       self.delta, int(self.since[j] * b)))
                self.since[j] = k - 1 - row
        # quality rules judge whole windows: keep the blocks until one is complete
        self._q_missing += miss.sum(0)
        self._q_blocks.append(X)
        self._q_n += n
        if self._q_n >= self.config.quality_window:
            signals += self._judge_quality(live)
        return signals

    def _judge_quality(self, live: np.ndarray) -> list[_Signal]:
        Xq = np.vstack(self._q_blocks)
        with np.errstate(invalid="ignore"):
            out = ((Xq < self.lo) | (Xq > self.hi)).sum(0)
        rules = self.rules
        broke = rules.update(np.concatenate((self._q_missing * live, out * live)), self._q_n)
        self._q_missing = np.zeros(len(self.names))
        self._q_blocks, self._q_n = [], 0
        signals = []
        F = len(self.names)
        for k in np.flatnonzero(broke).tolist():
            j = k % F
            signals.append(_Signal("data_quality", self.names[j], "missing_rate" if k < F else "out_of_range",
                                   _finite(rules.rates[k]), _finite(rules.limits[k]), rules.window))
        return signals

    def recent_shift(self) -> np.ndarray:
        """Mean standard score per column over the last few blocks (0 without data)."""
        k = min(self._ri, _SHIFT_BLOCKS)
        rows = [(self._ri - 1 - i) % _RECENT_BLOCKS for i in range(k)]
        return self.recent[rows].mean(0) / math.sqrt(self.config.block_size) if k else np.zeros(len(self.names))

    def summaries(self) -> list[dict[str, float] | None]:
        """Per column: blocks since its detector last fired, and mean and spread of the
        recent block statistics (what a restart re-warms a fresh detector with)."""
        k = min(self._ri, _RECENT_BLOCKS)
        out: list[dict[str, float] | None] = []
        for j in range(len(self.names)):
            if not self.ready[j]:
                out.append(None)
                continue
            n = int(self.since[j])
            m = min(n, k)
            rows = [(self._ri - 1 - i) % _RECENT_BLOCKS for i in range(m)]
            values = self.recent[rows, j] if m else np.zeros(0)
            mean = float(values.mean()) if m else 0.0
            sd = float(values.std()) if m > 1 else 1.0
            out.append({"n": n, "mean": mean, "sd": sd or 1.0})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names), "ready": self.ready.tolist(), "scores": self.scores.state_dict(),
            "lo": [x if math.isfinite(x) else None for x in self.lo.tolist()],
            "hi": [x if math.isfinite(x) else None for x in self.hi.tolist()],
            "rules": self.rules.state_dict(), "detectors": self.summaries(),
        }

    def load_state(self, state: Mapping[str, Any]) -> bool:
        """Restore; False (and a fresh warm-up) when the state is for other columns."""
        if list(state.get("names", [])) != list(self.names) or not any(state.get("ready", [])):
            return False
        F = len(self.names)
        self.scores.load_state(state["scores"])
        self.lo = np.array([-np.inf if x is None else x for x in state["lo"]], dtype=float)
        self.hi = np.array([np.inf if x is None else x for x in state["hi"]], dtype=float)
        self.rules.load_state(state["rules"])
        self.ready = np.asarray(state["ready"], dtype=bool)
        self.since[:] = 0
        for j, summary in enumerate(state["detectors"]):
            if summary is None or not self.ready[j]:
                self.ready[j] = False
                self.detectors[j] = None
                continue
            detector = MeanShiftDetector(self.detector_names[j], self.delta, seed=self.seed + j)
            rewarm(detector, summary, seed=self.seed + 7919 * (j + 1))
            self.detectors[j] = detector
            self.since[j] = summary["n"]
        self._warming = np.flatnonzero(~self.ready)
        self._warm, self._warm_n = [], 0
        return bool(self.ready.any()) and F > 0


class CategoricalWatch:
    """Categorical columns: frequency shift against the reference, missing and unseen rates."""

    _MISSING, _UNSEEN = -1, -2

    def __init__(self, names: Sequence[str], delta: float, config: ModelConfig):
        self.names = tuple(names)
        self.delta = delta
        self.config = config
        self.ready = False
        self._buffer: list[list] = [[] for _ in self.names]
        self._chunk = min(config.category_window, config.quality_window)
        self.codes: list[dict] = []
        self.shifts: list[FrequencyShift] = []
        self.rules: RateRule | None = None

    def update(self, columns: list[list]) -> list[_Signal]:
        """Take one block, as one list of values per categorical feature."""
        for kept, col in zip(self._buffer, columns):
            kept.extend(col)
        n = len(self._buffer[0])
        if not self.ready:
            if n >= self.config.warmup:
                self._fit(self._buffer)
                self._buffer = [[] for _ in self.names]
            return []
        # frequencies and rates are judged per window: work on a whole chunk at once
        if n < self._chunk:
            return []
        buffer, self._buffer = self._buffer, [[] for _ in self.names]
        return self._observe(buffer)

    def _fit(self, columns: list[list]) -> None:
        cfg = self.config
        missing_rates, unseen_rates = [], []
        for col in columns:
            n = len(col)
            counts = Counter(v for v in col if _is_category(v))
            valid = sum(counts.values())
            top = [c for c, _ in counts.most_common(cfg.max_categories)]
            k = len(top)
            lookup = {c: k for c in counts}  # rarer categories: the "other" bucket
            lookup.update({c: i for i, c in enumerate(top)})
            self.codes.append(lookup)
            reference = [counts[c] for c in top] + [valid - sum(counts[c] for c in top)]
            self.shifts.append(FrequencyShift(reference, self.delta, cfg.category_window))
            missing_rates.append(1 - valid / n)
            # Good-Turing: the share of values seen once estimates how often new ones appear
            singletons = sum(1 for c in counts.values() if c == 1)
            unseen_rates.append(singletons / valid if valid else 0.0)
        F = len(self.names)
        self.rules = RateRule(missing_rates + unseen_rates, len(columns[0]),
                              [cfg.missing_margin] * F + [cfg.unseen_margin] * F, cfg.quality_window)
        self.ready = True

    def _observe(self, columns: list[list]) -> list[_Signal]:
        F = len(self.names)
        n = len(columns[0])
        signals: list[_Signal] = []
        bad = np.zeros(2 * F)
        MISSING, UNSEEN = self._MISSING, self._UNSEEN
        for j, col in enumerate(columns):
            get = self.codes[j].get
            try:
                codes = np.array([MISSING if v is None else get(v, UNSEEN) for v in col], dtype=np.intp)
            except TypeError:  # unhashable values (lists, objects) count as missing
                codes = np.array([get(v, UNSEEN) if _is_category(v) else MISSING for v in col], dtype=np.intp)
            shift = self.shifts[j]
            unseen = codes == UNSEEN
            bad[j] = np.count_nonzero(codes == MISSING)
            bad[F + j] = np.count_nonzero(unseen)
            codes[unseen] = len(shift.reference) - 1
            codes = codes[codes >= 0]
            if len(codes) and shift.update(codes):
                signals.append(_Signal("feature", self.names[j], "chi_square", _finite(shift.statistic),
                                       _finite(shift.threshold), shift.window))
        rules = self.rules
        broke = rules.update(bad, n)
        if broke.any():
            for k in np.flatnonzero(broke).tolist():
                signals.append(_Signal("data_quality", self.names[k % F], "missing_rate" if k < F else "unseen_category",
                                       _finite(rules.rates[k]), _finite(rules.limits[k]), rules.window))
        return signals

    def state_dict(self) -> dict[str, Any]:
        if not self.ready:
            return {"names": list(self.names), "ready": False}
        return {
            "names": list(self.names), "ready": True,
            "codes": [[[c, i] for c, i in lookup.items()] for lookup in self.codes],
            "shifts": [s.state_dict() for s in self.shifts], "rules": self.rules.state_dict(),
        }

    def load_state(self, state: Mapping[str, Any]) -> bool:
        if list(state.get("names", [])) != list(self.names) or not state.get("ready"):
            return False
        cfg = self.config
        F = len(self.names)
        self.codes = [{c: i for c, i in pairs} for pairs in state["codes"]]
        self.shifts = [FrequencyShift([0], self.delta, cfg.category_window).load_state(s) for s in state["shifts"]]
        self.rules = RateRule([0.0] * 2 * F, 1, [cfg.missing_margin] * F + [cfg.unseen_margin] * F,
                              cfg.quality_window).load_state(state["rules"])
        self.ready = True
        return True


def _is_category(v: Any) -> bool:
    return v is not None and isinstance(v, (str, int, bool))


class OutcomeWatch:
    """Labelled outcomes of one model version: reference error rate and an error-rate detector."""

    RECENT = 500

    def __init__(self, detector: str, delta: float, warmup: int, seed: int):
        self.detector_name = detector
        self.delta = delta
        self.warmup = warmup
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.detector = ErrorRateDetector(self.detector_name, self.delta)
        self.n = 0
        self.reference_wrong = 0
        self.recent: deque[int] = deque(maxlen=self.RECENT)
        self.since = [0, 0]  # outcomes and errors since the detector last fired

    @property
    def reference_rate(self) -> float:
        return self.reference_wrong / max(1, min(self.n, self.warmup))

    def update(self, wrong: int) -> _Signal | None:
        self.n += 1
        self.recent.append(wrong)
        self.since[0] += 1
        self.since[1] += wrong
        fired = self.detector.update(wrong)
        if self.n <= self.warmup:
            self.reference_wrong += wrong
            return None
        if not fired:
            return None
        window, self.since = self.since[0], [0, 0]
        rate = sum(self.recent) / len(self.recent)
        if rate <= self.reference_rate:
            return None  # the error rate fell: a change, but not one to act on
        return _Signal("performance", "error_rate", self.detector_name, _finite(rate),
                       _finite(self.reference_rate), window)

    def state_dict(self) -> dict[str, Any]:
        n, wrong = self.since
        return {"n": self.n, "reference_wrong": self.reference_wrong, "recent": list(self.recent),
                "detector": {"n": n, "mean": wrong / n if n else 0.0, "sd": 0.0}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.n = int(state["n"])
        self.reference_wrong = int(state["reference_wrong"])
        self.recent.extend(int(x) for x in state["recent"])
        summary = state["detector"]
        rewarm(self.detector, summary, seed=self.seed)
        self.since = [int(summary["n"]), int(round(summary["mean"] * summary["n"]))]


class ModelMonitor:
    """Everything watched for one model; `DriftMonitor` routes records to it."""

    def __init__(self, config: ModelConfig, seed: int):
        self.config = cfg = config
        self.seed = seed
        streams = max(1, cfg.drift_streams)
        delta = cfg.alpha / streams
        names = list(cfg.numeric_features)
        kinds = ["feature"] * len(names)
        detectors = [cfg.feature_detector] * len(names)
        if cfg.watch_score:
            names.append("score")
            kinds.append("prediction")
            detectors.append(cfg.score_detector)
        self.score_column = len(cfg.numeric_features) if cfg.watch_score else None
        self.numeric = NumericWatch(names, kinds, detectors, delta, cfg, seed) if names else None
        self.categories = CategoricalWatch(cfg.categorical_features, delta, cfg) if cfg.categorical_features else None
        perf_delta = cfg.performance_alpha / (2 if cfg.estimate else 1)
        self.outcomes = OutcomeWatch(cfg.error_detector, perf_delta, cfg.label_warmup, seed + 15485863)
        self.estimate = self._new_estimate(perf_delta) if cfg.estimate else None
        self._pending_scores: list[np.ndarray] = []
        self._pending_n = 0
        self._perf_delta = perf_delta
        self._num_get = _getter(cfg.numeric_features)
        self.version: str | None = None
        self._raw_version: Any = None
        self._block_size = cfg.block_size * cfg.batch_blocks
        self.block: list[Prediction] = []
        self.n = 0                 # predictions observed
        self.n_outcomes = 0        # labelled outcomes observed
        self.last_alert: dict[str, int] = {}
        self.counts: Counter[str] = Counter()
        self.invalid: Counter[str] = Counter()   # feature -> values of the wrong type
        self.last_ts = 0.0

    def _new_estimate(self, delta: float) -> ExpectedErrorEstimate:
        cfg = self.config
        return ExpectedErrorEstimate(
            decision_threshold=cfg.decision_threshold, window=cfg.estimate_window, reference_size=cfg.warmup,
            alpha=delta, min_increase=cfg.estimate_min_increase, calibration_labels=cfg.calibration_labels,
        )

    # -- predictions --------------------------------------------------------------------

    def observe(self, p: Prediction, join: LabelJoin | None, out: list[DriftAlert]) -> None:
        if p.model_version != self._raw_version:
            self._switch_version(p.model_version, join, out)
        block = self.block
        block.append(p)
        if len(block) >= self._block_size:
            self.flush(join, out)

    def _switch_version(self, raw: Any, join: LabelJoin | None, out: list[DriftAlert]) -> None:
        version = str(raw)
        self._raw_version = raw
        if version == self.version:
            return
        if self.version is not None:
            self.flush(join, out)
            if self.config.rewarm_on_new_version:
                self._new_version()
        self.version = version

    def _new_version(self) -> None:
        """A new model version scores differently: its score and performance references start over."""
        self.counts["new_versions"] += 1
        if self.score_column is not None:
            self.numeric.reset_columns([self.score_column])
        self.outcomes.reset()
        if self.estimate is not None:
            self.estimate = self._new_estimate(self._perf_delta)
            self._pending_scores, self._pending_n = [], 0

    def flush(self, join: LabelJoin | None, out: list[DriftAlert]) -> None:
        block, self.block = self.block, []
        if not block:
            return
        n = len(block)
        self.n += n
        last = block[-1]
        self.last_ts = _finite(last.ts) if isinstance(last.ts, (int, float)) else self.last_ts
        feats = [p.features for p in block]
        preds = [p.prediction for p in block]
        scores = self._scores([x.get("score") if type(x) is dict else x for x in preds])
        signals: list[_Signal] = []
        if self.numeric is not None:
            F = len(self.config.numeric_features)
            if self.score_column is None:
                X = self._numeric(feats)
            else:
                X = np.empty((n, F + 1))
                if F:
                    X[:, :F] = self._numeric(feats)
                X[:, F] = scores
            signals += self.numeric.update(X)
        if self.categories is not None:
            signals += self.categories.update([[f.get(k) for f in feats] for k in self.config.categorical_features])
        if self.estimate is not None:
            # the estimate judges whole windows: hand it scores a window at a time
            self._pending_scores.append(scores)
            self._pending_n += n
            if self._pending_n >= self.config.estimate_window:
                e = self.estimate
                if e.update(np.concatenate(self._pending_scores)):
                    signals.append(_Signal("performance", "estimated_error_rate", "cbpe", _finite(e.estimate),
                                           _finite(e.limit), e.window))
                self._pending_scores, self._pending_n = [], 0
        if join is not None and self.config.join_labels:
            threshold = self.config.decision_threshold
            predicted = [x.get("label") if type(x) is dict else None for x in preds]
            for o in join.add_block(block, self.version, scores.tolist(), predicted, threshold):
                self.observe_outcome(o, out)
        self._emit(signals, self.n, out)

    def _numeric(self, feats: list[dict]) -> np.ndarray:
        """The block's numeric features as floats; missing and unreadable values are NaN.

        A value is a number if `float()` takes it (numeric strings and booleans too, which
        keeps the common path one C-level pass); anything else counts as invalid."""
        names = self.config.numeric_features
        F = len(names)
        try:
            X = np.fromiter(chain.from_iterable(map(self._num_get, feats)), float, count=len(feats) * F)
            X = X.reshape(len(feats), F)
        except (KeyError, TypeError, ValueError):
            X = np.full((len(feats), F), np.nan)
            for i, f in enumerate(feats):
                for j, name in enumerate(names):
                    v = f.get(name)
                    if v is None:
                        continue
                    try:
                        X[i, j] = float(v)
                    except (TypeError, ValueError, OverflowError):
                        self.invalid[name] += 1
        X[np.isinf(X)] = np.nan
        return X

    def _scores(self, raw: list) -> np.ndarray:
        try:
            s = np.fromiter(raw, float, count=len(raw))
        except (TypeError, ValueError):
            s = np.array([v if type(v) in (float, int) else None for v in raw], dtype=float)
        s[np.isinf(s)] = np.nan
        bad = ~((s >= 0.0) & (s <= 1.0)) if self.estimate is not None else np.isnan(s)
        if bad.any():
            self.counts["invalid_scores"] += int(bad.sum())
        return s

    # -- labels ---------------------------------------------------------------------------

    def waiting_outcome(self, request_id: str, label: Any, label_ts: float) -> Outcome | None:
        """The outcome for a prediction still in the unfinished batch, if it is there."""
        for p in reversed(self.block):
            if p.request_id == request_id:
                x = p.prediction
                raw = x.get("score") if type(x) is dict else x
                score = float(raw) if type(raw) in (int, float) and math.isfinite(raw) else None
                predicted = x.get("label") if type(x) is dict else None
                if predicted is None and score is not None:
                    predicted = int(score >= self.config.decision_threshold)
                return Outcome(request_id, p.model, self.version or "", score, predicted, label, p.ts, label_ts)
        return None

    def observe_outcome(self, o: Outcome, out: list[DriftAlert]) -> None:
        if o.model_version != self.version:
            self.counts["outcomes_for_old_version"] += 1
            return
        actual = _binary(o.label)
        predicted = _binary(o.predicted)
        if actual is None or predicted is None:
            self.counts["invalid_outcomes"] += 1
            return
        self.n_outcomes += 1
        if self.estimate is not None and o.score is not None:
            self.estimate.calibrate(o.score, actual)
        signal = self.outcomes.update(int(predicted != actual))
        if signal is not None:
            self._emit([signal], self.n_outcomes, out, ts=o.label_ts)

    def warming_up(self) -> list[str]:
        """Columns (and "outcomes") still building their reference."""
        out = []
        if self.numeric is not None:
            out += [name for name, ready in zip(self.numeric.names, self.numeric.ready.tolist()) if not ready]
        if self.categories is not None and not self.categories.ready:
            out += list(self.categories.names)
        if self.outcomes.n < self.outcomes.warmup:
            out.append("outcomes")
        return out

    # -- alerts ---------------------------------------------------------------------------

    def deadletter(self, rate: float, ts: float | None, window: int, out: list[DriftAlert]) -> None:
        limit = self.config.deadletter_rate
        if rate > limit:
            self._emit([_Signal("data_quality", "deadletter", "deadletter_rate", _finite(rate), limit, window)],
                       self.n, out, ts=ts)

    def _emit(self, signals: list[_Signal], position: int, out: list[DriftAlert], ts: float | None = None) -> None:
        for s in signals:
            key = f"{s.kind}|{s.subject}|{s.detector}"
            last = self.last_alert.get(key)
            if last is not None and position - last < self.config.cooldown:
                self.counts["suppressed"] += 1
                continue
            self.last_alert[key] = position
            self.counts[f"alerts_{s.kind}"] += 1
            digest = hashlib.blake2b(f"{self.seed}|{self.config.model}|{key}|{position}|{self.n_outcomes}".encode(),
                                     digest_size=16).hexdigest()
            out.append(DriftAlert(
                alert_id=digest, model=self.config.model, model_version=self.version or "", kind=s.kind,
                subject=s.subject, detector=s.detector, statistic=s.statistic, threshold=s.threshold,
                window=int(s.window), ts=self.last_ts if ts is None else float(ts),
            ))

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "n": self.n, "n_outcomes": self.n_outcomes, "last_ts": self.last_ts,
            "last_alert": dict(self.last_alert), "counts": dict(self.counts), "invalid": dict(self.invalid),
            "block": [_json_safe(p.to_dict()) for p in self.block],
            "numeric": self.numeric.state_dict() if self.numeric else None,
            "categories": self.categories.state_dict() if self.categories else None,
            "outcomes": self.outcomes.state_dict(),
            "estimate": self.estimate.state_dict() if self.estimate else None,
        }

    def load_state(self, state: Mapping[str, Any]) -> list[str]:
        """Restore; the names of the parts that start a fresh warm-up instead."""
        fresh = []
        self.version = state.get("version")
        self._raw_version = self.version
        self.n = int(state.get("n", 0))
        self.n_outcomes = int(state.get("n_outcomes", 0))
        self.last_ts = float(state.get("last_ts", 0.0))
        self.last_alert = {k: int(v) for k, v in state.get("last_alert", {}).items()}
        self.counts = Counter(state.get("counts", {}))
        self.invalid = Counter(state.get("invalid", {}))
        self.block = []
        for raw in state.get("block", []):
            try:
                self.block.append(Prediction.decode(raw))
            except ContractError:
                self.counts["unrestorable_block_records"] += 1
        for name in ("numeric", "categories"):
            watch, saved = getattr(self, name), state.get(name)
            if watch is not None and not (saved and watch.load_state(saved)):
                fresh.append(name)
        if state.get("outcomes"):
            self.outcomes.load_state(state["outcomes"])
        if self.estimate is not None:
            try:
                self.estimate.load_state(state["estimate"])
            except (KeyError, TypeError, ValueError):
                fresh.append("estimate")
        return fresh


def _getter(names: Sequence[str]):
    if not names:
        return lambda f: ()
    if len(names) == 1:
        name = names[0]
        return lambda f: (f[name],)
    return itemgetter(*names)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None (what JSON can carry, and what the monitor calls missing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _binary(v: Any) -> int | None:
    if v is True or v is False:
        return int(v)
    if type(v) in (int, float) and v in (0, 1):
        return int(v)
    return None


# ---------------------------------------------------------------------------------------


class DriftMonitor:
    """Watches models' inputs, scores and outcomes; returns `DriftAlert`s, usable without Kafka.

    Built from a `MonitorConfig` (or its dict form, or a list of `ModelConfig`).

    How it stays fast and quiet:
    - The first `warmup` predictions of a model are its reference: per numeric column a
      quantile grid (values become normal scores), bounds, missing rate; per categorical
      column its frequencies. The reference then fills the detectors' windows, quietly.
    - Predictions are taken in blocks of `block_size` (16): per column the block's standard
      scores are summed (numpy) and `sum / sqrt(count)`, N(0, 1) while nothing changes,
      feeds one River detector. `batch_blocks` (3) blocks are judged in one call to spread
      numpy's per-call cost. One detector update per column per block, not per prediction,
      is what keeps one process above 50,000 predictions a second; alerts come out when a
      batch is judged, so call `flush()` when the stream goes idle. A label that arrives
      while its prediction waits in a batch is joined at once.
    - `alpha` is a family-wise budget split evenly over the watched columns (Bonferroni);
      an alert for the same (kind, subject, detector) is suppressed for `cooldown`
      observations; the error rate alerts only when it rises.
    - `state_dict()` is plain JSON. River detectors are not serialised (no pickle): each
      column keeps a summary of its recent block statistics, and `load_state` refills fresh
      detectors with synthetic values of that level, quietly, so the restarted monitor
      neither warms up again nor floods (a restart during warm-up starts it again).

    Records that break their contract are counted in `counters()` and never raise.
    Deterministic: the same records in the same order give the same alerts, ids included,
    for the same seed.

    Examples
    --------
    >>> import random
    >>> from freshet.contracts import Prediction
    >>> monitor = DriftMonitor([ModelConfig("fraud", numeric_features=["amount"], warmup=500, estimate=False)])
    >>> rng = random.Random(1)
    >>> def prediction(i, shift):
    ...     return Prediction(f"r{i}", "fraud", "1", {}, {"amount": rng.gauss(shift, 1)}, {"score": 0.1}, ts=i)
    >>> [a for i in range(3000) for a in monitor.observe(prediction(i, 0.0))]
    []
    >>> alerts = [a for i in range(3000, 3200) for a in monitor.observe(prediction(i, 1.0))]
    >>> [(a.kind, a.subject, a.detector) for a in alerts]
    [('feature', 'amount', 'adwin')]

    """

    def __init__(self, config: MonitorConfig | Mapping[str, Any] | Sequence[ModelConfig], *,
                 known_features: Iterable[str] | None = None):
        if isinstance(config, Mapping):
            config = MonitorConfig.from_dict(config)
        elif not isinstance(config, MonitorConfig):
            config = MonitorConfig(models=tuple(config))
        self.config = config
        self.models = {m.model: ModelMonitor(m, config.seed + 1000003 * i) for i, m in enumerate(config.models)}
        self.join = LabelJoin(config.label_wait_s, config.max_pending_labels, config.label_entity_keys)
        self.rejected: Counter[str] = Counter()
        self.unmonitored: Counter[str] = Counter()
        if known_features is not None:
            self.check_features(known_features)

    def check_features(self, known_feature_names: Iterable[str]) -> None:
        """Raise ConfigError naming every configured feature not among the known ones."""
        known = set(known_feature_names)
        problems = []
        for name, m in self.models.items():
            unknown = [f for f in (*m.config.numeric_features, *m.config.categorical_features) if f not in known]
            if unknown:
                problems.append(f"model {name!r}: {', '.join(map(repr, unknown))}")
        if problems:
            raise ConfigError("unknown feature(s) in the monitor config: " + "; ".join(problems))

    def observe(self, prediction: Prediction | Mapping[str, Any] | bytes | str) -> list[DriftAlert]:
        """Take one `freshet.predictions` record; the alerts it completes (usually none).

        A label that arrived before its prediction is joined here, so a performance alert
        can come out of this call too."""
        out: list[DriftAlert] = []
        p = prediction if type(prediction) is Prediction else self._decode(prediction, Prediction)
        if p is None:
            return out
        m = self.models.get(p.model) if type(p.model) is str else None
        if m is None:
            self._unmonitored(p.model)
        elif type(p.features) is not dict:
            self._reject("features is not an object")
        elif type(p.request_id) is not str or type(p.ts) not in _TS_TYPES:
            self._reject("bad request_id or ts")
        else:
            m.observe(p, self.join, out)
        return out

    def observe_label(self, label: Label | Mapping[str, Any] | bytes | str) -> list[DriftAlert]:
        """Take one `freshet.labels` record; alerts on the labelled error rate it completes."""
        out: list[DriftAlert] = []
        if type(label) is Label:
            try:
                label.check()
            except ContractError as exc:
                self._reject(str(exc)[:80])
                return out
            lab = label
        else:
            lab = self._decode(label, Label)
        if lab is None:
            return out
        if not isinstance(lab.ts, (int, float)) or (lab.request_id is not None and type(lab.request_id) is not str):
            self._reject("bad label request_id or ts")
            return out
        # the join's clock is prediction time: bring it up to the predictions still in unfinished batches
        for m in self.models.values():
            if m.block and m.config.join_labels and type(m.block[-1].ts) in _TS_TYPES:
                self.join.tick(float(m.block[-1].ts))
        outcomes = self.join.match(lab.request_id, lab.label, float(lab.ts), lab.entities)
        if not outcomes and lab.request_id and self.join.is_waiting_label(lab.request_id):
            # its prediction may sit in a model's unfinished batch: join it now, not a batch later
            for m in self.models.values():
                o = m.waiting_outcome(lab.request_id, lab.label, float(lab.ts)) if m.config.join_labels else None
                if o is not None:
                    self.join.join_ahead(lab.request_id)
                    outcomes = [o]
                    break
        for o in outcomes:
            m = self.models.get(o.model)
            if m is not None:
                m.observe_outcome(o, out)
        return out

    def observe_deadletter_rate(self, rate: float, model: str | None = None, ts: float | None = None,
                                window: int = 0) -> list[DriftAlert]:
        """The stream engine's dead-letter rate (share of events rejected over `window` events);
        a data-quality alert for `model` (or every model) when it is over `deadletter_rate`."""
        out: list[DriftAlert] = []
        if not isinstance(rate, (int, float)) or not math.isfinite(rate):
            self._reject("bad dead-letter rate")
            return out
        targets = [self.models[model]] if model in self.models else list(self.models.values()) if model is None else []
        if not targets:
            self._unmonitored(model)
        for m in targets:
            m.deadletter(float(rate), ts, int(window), out)
        return out

    def flush(self) -> list[DriftAlert]:
        """Judge partly filled blocks now (on idle, or before a snapshot)."""
        out: list[DriftAlert] = []
        for m in self.models.values():
            m.flush(self.join, out)
        return out

    def _decode(self, raw: Any, contract: type) -> Any:
        try:
            return contract.decode(raw)
        except ContractError as exc:
            self._reject(str(exc).split(":")[0][:80])
        except (TypeError, ValueError, AttributeError) as exc:  # not a message at all
            self._reject(f"not a {contract.SCHEMA} record: {type(exc).__name__}")
        return None

    def _reject(self, reason: str) -> None:
        # reasons quote the offending value: cap how many distinct ones a flood of junk can add
        if reason not in self.rejected and len(self.rejected) >= 100:
            reason = "<other>"
        self.rejected[reason] += 1

    def _unmonitored(self, model: Any) -> None:
        name = model if isinstance(model, str) and len(self.unmonitored) < 1000 else "<other>"
        self.unmonitored[name] += 1

    # -- reporting -------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Counts for logs and metrics: records rejected, per-model observations, alerts, join."""
        models = {}
        for name, m in self.models.items():
            models[name] = {
                "version": m.version, "predictions": m.n + len(m.block), "outcomes": m.n_outcomes,
                "warming_up": m.warming_up(),
                "invalid_values": dict(m.invalid), **dict(m.counts),
            }
        return {"rejected": dict(self.rejected), "unmonitored": dict(self.unmonitored),
                "labels": self.join.counters(), "models": models}

    def statistics(self) -> dict[str, dict[str, float]]:
        """Current detector statistics per model, for gauges: recent mean shift (reference
        standard deviations) per numeric stream, reference and recent error rates, estimate."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.models.items():
            stats: dict[str, float] = {}
            watch = m.numeric
            if watch is not None and watch.ready.any():
                shift = watch.recent_shift()
                for subject, ready, value in zip(watch.names, watch.ready.tolist(), shift.tolist()):
                    if ready:
                        stats[f"shift:{subject}"] = _finite(value)
            if m.outcomes.n:
                stats["error_rate:reference"] = m.outcomes.reference_rate
                stats["error_rate:recent"] = sum(m.outcomes.recent) / len(m.outcomes.recent)
            if m.estimate is not None and math.isfinite(m.estimate.result()):
                stats["estimated_error_rate"] = m.estimate.result()
            out[name] = stats
        return out

    # -- restart ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A JSON-compatible snapshot (no pickle): references, detector summaries, cooldown
        clocks, counters and the label join's waiting predictions."""
        return {
            "format": STATE_FORMAT, "seed": self.config.seed,
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "join": self.join.state_dict(),
            "rejected": dict(self.rejected), "unmonitored": dict(self.unmonitored),
        }

    def load_state(self, state: Mapping[str, Any]) -> dict[str, list[str]]:
        """Restore a snapshot. Detectors are re-warmed quietly from their summaries, so an
        unchanged stream raises nothing new; a model or feature set the snapshot does not
        cover starts a fresh warm-up. Returns, per model, the parts warming up afresh."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a monitor snapshot: expected format {STATE_FORMAT!r}")
        fresh = {}
        saved = state.get("models", {})
        for name, m in self.models.items():
            if name in saved:
                parts = m.load_state(saved[name])
            else:
                parts = ["numeric", "categories", "outcomes", "estimate"]
            if parts:
                fresh[name] = parts
        self.join.load_state(state.get("join", {}))
        self.rejected = Counter(state.get("rejected", {}))
        self.unmonitored = Counter(state.get("unmonitored", {}))
        return fresh
