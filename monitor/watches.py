"""Watches: one per group of a model's streams (numeric columns, categorical columns, outcomes).

Each owns its reference (warm-up), detectors, quality rules and restart summary, and turns
values into `CandidateAlert`s.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .config import ModelConfig
from .detectors import ErrorRateDetector, FrequencyShift, MeanShiftDetector, RateRule, StandardScores, rewarm

_RECENT_BLOCKS = 128   # block statistics kept per column (restart summaries)
_SHIFT_BLOCKS = 4      # of which the newest few give an alert's statistic


@dataclass(slots=True)
class CandidateAlert:
    """An alert a watch would raise, before cooldown and de-duplication."""

    kind: str
    subject: str
    detector: str
    statistic: float
    threshold: float
    window: int


def finite_or_zero(x: float) -> float:
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
        # windowed columns whose window is not full yet: neither judged nor sampled until then
        # (prediction time, epoch seconds; -inf = not held)
        self.held_until = np.full(F, -np.inf)
        # smallest level (reference sd) an alert needs: > 0 for columns judged against a training reference
        self.tolerance = np.zeros(F)
        self.tolerated = 0   # detections whose level stayed within the tolerance
        # detections within the tolerance so far: they alert once the level (the detector's window
        # after the change, purged of what came before it) confirms them
        self.pending = np.zeros(F, dtype=bool)

    def reset_columns(self, columns: Sequence[int]) -> None:
        """Forget these columns' reference; they warm up again from the next block."""
        columns = list(columns)
        self._forget(columns)
        self.held_until[columns] = -np.inf
        self.tolerance[columns] = 0.0
        self.pending[columns] = False
        self._warming = np.union1d(self._warming, columns).astype(int)
        self._warm, self._warm_n = [], 0

    def _forget(self, columns: list[int]) -> None:
        self.ready[columns] = False
        for j in columns:
            self.detectors[j] = None
        self.since[columns] = 0
        self.recent[:, columns] = 0.0

    def hold_columns(self, columns: Sequence[int], until: float) -> None:
        """These columns' windows are still filling: judge nothing and sample no reference until
        `until` (prediction time), then warm up from the traffic."""
        columns = list(columns)
        if not columns:
            return
        self._forget(columns)
        self.held_until[columns] = until
        self._warming = np.setdiff1d(self._warming, columns).astype(int)
        self._warm, self._warm_n = [], 0

    def use_reference(self, columns: Sequence[int], sample: np.ndarray, low: Sequence[float | None],
                      high: Sequence[float | None], missing: Sequence[float], n: int, tolerance: float = 0.0) -> None:
        """Judge these columns against a training reference from now on: `sample` holds its
        quantiles (one column each, an equally weighted sample), `low`/`high` its bounds and
        `missing` its missing rates over `n` rows. The detectors start as if they had seen
        the reference (unit-normal block statistics), so the first blocks are judged at once."""
        cfg = self.config
        F = len(self.names)
        cols = list(columns)
        if not cols:
            return
        self.held_until[cols] = -np.inf
        self.tolerance[cols] = tolerance
        self.pending[cols] = False
        self._warming = np.setdiff1d(self._warming, cols).astype(int)
        self._warm, self._warm_n = [], 0
        self.scores.fit(sample, columns=cols, width=F)
        lo = np.array([np.nan if x is None else x for x in low], dtype=float)
        hi = np.array([np.nan if x is None else x for x in high], dtype=float)
        span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
        self.lo[cols] = np.where(np.isfinite(lo), lo - cfg.out_of_range_margin * span, -np.inf)
        self.hi[cols] = np.where(np.isfinite(hi), hi + cfg.out_of_range_margin * span, np.inf)
        self.rules.reference[cols] = np.asarray(missing, dtype=float)
        self.rules.reference[[F + j for j in cols]] = 0.0
        self.rules.reference_size = max(self.rules.reference_size, int(n))
        self.since[cols] = 0
        self.recent[:, cols] = 0.0
        blocks = max(1, cfg.warmup // cfg.block_size)
        for j in cols:
            detector = MeanShiftDetector(self.detector_names[j], self.delta, seed=self.seed + j)
            rewarm(detector, {"n": blocks, "mean": 0.0, "sd": 1.0}, seed=self.seed + 7919 * (j + 1))
            self.detectors[j] = detector
        self.ready[cols] = True

    def release_held(self, now: float) -> list[int]:
        """Columns whose hold ended by `now` start warming up from the traffic; returns them."""
        due = np.flatnonzero(np.isfinite(self.held_until) & (self.held_until <= now)).tolist()
        if due:
            self.reset_columns(due)
        return due

    def update(self, X: np.ndarray, now: float | None = None) -> list[CandidateAlert]:
        if now is not None and np.isfinite(self.held_until).any():
            self.release_held(now)
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

    def _observe(self, X: np.ndarray, live: np.ndarray, quiet: bool) -> list[CandidateAlert]:
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
        signals: list[CandidateAlert] = []
        fired_now = {j for j, _ in fired}
        confirmed = [(j, k - 1) for j in np.flatnonzero(self.pending & has.any(0)).tolist()
                     if j not in fired_now and self._beyond_tolerance(j) is not None]
        if fired or confirmed:
            shift = self.recent_shift()
            for j, row in fired + confirmed:
                window = int(self.since[j] * b)
                self.since[j] = k - 1 - row
                statistic = shift[j]
                if self.tolerance[j] > 0:
                    level = self._beyond_tolerance(j)
                    if level is None:
                        self.tolerated += not self.pending[j]
                        self.pending[j] = True
                        continue
                    statistic = level
                    self.pending[j] = False
                signals.append(CandidateAlert(self.kinds[j], self.names[j], self.detector_names[j],
                                              finite_or_zero(statistic), self.delta, window))
        # quality rules judge whole windows: keep the blocks until one is complete
        self._q_missing += miss.sum(0)
        self._q_blocks.append(X)
        self._q_n += n
        if self._q_n >= self.config.quality_window:
            signals += self._judge_quality(live)
        return signals

    def _beyond_tolerance(self, j: int) -> float | None:
        """Column j's level (per prediction, reference sd) when it is beyond its tolerance, else None."""
        level = self.detectors[j].level() if self.detectors[j] is not None else None
        if level is None:
            return 0.0 if self.tolerance[j] <= 0 else None
        level /= math.sqrt(self.config.block_size)
        return level if abs(level) >= self.tolerance[j] else None

    def _judge_quality(self, live: np.ndarray) -> list[CandidateAlert]:
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
            detector = "missing_rate" if k < F else "out_of_range"
            signals.append(CandidateAlert("data_quality", self.names[j], detector, finite_or_zero(rules.rates[k]),
                                          finite_or_zero(rules.limits[k]), rules.window))
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
            "held_until": [x if math.isfinite(x) else None for x in self.held_until.tolist()],
            "tolerance": self.tolerance.tolist(), "pending": self.pending.tolist(),
        }

    def load_state(self, state: Mapping[str, Any]) -> bool:
        """Restore; False (and a fresh warm-up) when the state is for other columns."""
        if list(state.get("names", [])) != list(self.names):
            return False
        self.tolerance = np.asarray(state.get("tolerance") or [0.0] * len(self.names), dtype=float)
        self.pending = np.asarray(state.get("pending") or [False] * len(self.names), dtype=bool)
        held = state.get("held_until") or [None] * len(self.names)
        self.held_until = np.array([-np.inf if x is None else x for x in held], dtype=float)
        if not any(state.get("ready", [])):
            self._warming = np.flatnonzero(~np.isfinite(self.held_until))
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
        self._warming = np.flatnonzero(~self.ready & ~np.isfinite(self.held_until))
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

    def update(self, columns: list[list]) -> list[CandidateAlert]:
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

    def use_reference(self, references: Sequence[Mapping[str, Any]]) -> None:
        """Judge against a training reference per column: {"shares": {value: share}, "other": share,
        "missing_rate": rate, "n": rows} (what `freshet.reference.CategoricalReference` holds)."""
        cfg = self.config
        self.codes, self.shifts = [], []
        missing_rates, unseen_rates, n = [], [], 1
        for ref in references:
            n = max(n, int(ref.get("n", 0)))
            valid = n * (1 - float(ref.get("missing_rate", 0.0)))
            shares = dict(ref.get("shares", {}))
            top = list(shares)[: cfg.max_categories]
            lookup = {c: i for i, c in enumerate(top)}
            self.codes.append(lookup)
            counts = [shares[c] * valid for c in top] + [max(0.0, 1 - sum(shares[c] for c in top)) * valid]
            self.shifts.append(FrequencyShift(counts, self.delta, cfg.category_window))
            missing_rates.append(float(ref.get("missing_rate", 0.0)))
            # values outside the reference's list count in its "other" bucket: no unseen-rate rule
            unseen_rates.append(0.0)
        F = len(self.names)
        self.rules = RateRule(missing_rates + unseen_rates, n,
                              [cfg.missing_margin] * F + [1.0] * F, cfg.quality_window)
        self._buffer = [[] for _ in self.names]
        self.ready = True

    def _observe(self, columns: list[list]) -> list[CandidateAlert]:
        F = len(self.names)
        n = len(columns[0])
        signals: list[CandidateAlert] = []
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
                signals.append(CandidateAlert("feature", self.names[j], "chi_square", finite_or_zero(shift.statistic),
                                              finite_or_zero(shift.threshold), shift.window))
        rules = self.rules
        broke = rules.update(bad, n)
        if broke.any():
            for k in np.flatnonzero(broke).tolist():
                detector = "missing_rate" if k < F else "unseen_category"
                signals.append(CandidateAlert("data_quality", self.names[k % F], detector,
                                              finite_or_zero(rules.rates[k]), finite_or_zero(rules.limits[k]),
                                              rules.window))
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
    """Labelled outcomes of one model version: reference error rate and an error-rate detector.

    `subject` names the rate in alerts: "error_rate" over every labelled outcome, or a
    class-conditional rate ("miss_rate": labelled positives predicted negative) whose outcomes
    are far fewer, hence its own `warmup` and `recent` counts.
    """

    RECENT = 500

    def __init__(self, detector: str, delta: float, warmup: int, seed: int, subject: str = "error_rate",
                 recent: int | None = None):
        self.detector_name = detector
        self.delta = delta
        self.warmup = warmup
        self.seed = seed
        self.subject = subject
        self.recent_size = recent or self.RECENT
        self.reset()

    def reset(self) -> None:
        self.detector = ErrorRateDetector(self.detector_name, self.delta)
        self.n = 0
        self.reference_wrong = 0
        self.reference: float | None = None   # a rate given by the training reference (no warm-up then)
        self.recent: deque[int] = deque(maxlen=self.recent_size)
        self.since = [0, 0]  # outcomes and errors since the detector last fired

    @property
    def reference_rate(self) -> float:
        if self.reference is not None:
            return self.reference
        return self.reference_wrong / max(1, min(self.n, self.warmup))

    @property
    def warming_up(self) -> bool:
        return self.reference is None and self.n < self.warmup

    def use_reference(self, rate: float, n: int) -> None:
        """Judge from the next outcome on against a rate measured on `n` outcomes elsewhere (the
        version's holdout): the detector starts as if it had seen them, quietly."""
        self.reset()
        self.reference = float(rate)
        rewarm(self.detector, {"n": int(n), "mean": self.reference, "sd": 0.0}, seed=self.seed)

    def update(self, wrong: int) -> CandidateAlert | None:
        self.n += 1
        self.recent.append(wrong)
        self.since[0] += 1
        self.since[1] += wrong
        fired = self.detector.update(wrong)
        if self.reference is None and self.n <= self.warmup:
            self.reference_wrong += wrong
            return None
        if not fired:
            return None
        window, self.since = self.since[0], [0, 0]
        rate = sum(self.recent) / len(self.recent)
        if self.subject != "error_rate":
            # few outcomes per class: the recent ones straddle the change; judge the part after it
            level = self.detector.level()
            rate = rate if level is None else level
        if rate <= self.reference_rate:
            return None  # the error rate fell: a change, but not one to act on
        return CandidateAlert("performance", self.subject, self.detector_name, finite_or_zero(rate),
                              finite_or_zero(self.reference_rate), window)

    def state_dict(self) -> dict[str, Any]:
        n, wrong = self.since
        return {"n": self.n, "reference_wrong": self.reference_wrong, "reference": self.reference,
                "recent": list(self.recent), "detector": {"n": n, "mean": wrong / n if n else 0.0, "sd": 0.0}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.n = int(state["n"])
        self.reference_wrong = int(state["reference_wrong"])
        self.reference = None if state.get("reference") is None else float(state["reference"])
        self.recent.extend(int(x) for x in state["recent"])
        summary = state["detector"]
        rewarm(self.detector, summary, seed=self.seed)
        self.since = [int(summary["n"]), int(round(summary["mean"] * summary["n"]))]
