"""The monitor's detectors: River change detectors, frequency-shift tests and data-quality rules.

Each is a small object with one verb (`update`) and a `state_dict`/`load_state` pair
holding only JSON values; `monitor.watches` decides what feeds them, `monitor.drift` when they may alert.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterable, Sequence

import numpy as np
from river import drift
from river.drift import binary
from scipy import special, stats

NUMERIC_DETECTORS = ("adwin", "page_hinkley", "kswin")
ERROR_DETECTORS = ("adwin", "hddm_a", "hddm_w", "ddm", "eddm", "fhddm")
STANDARDISATIONS = ("quantile", "zscore")

# ADWIN's cut test is  |mean0 - mean1| > sqrt(2 v d'/m) + 2/3 d'/m : the second (Bernstein)
# term assumes values in [0, 1]. Block statistics here have unit variance, so that term
# dominated: scaling the input by 10 leaves the variance term in charge. Measured on blocks
# of 16: a 1 sd shift found in 44 predictions instead of 101, with false alarms still about
# 0.005 per 100,000 predictions per feature.
_ADWIN_GAIN = 10.0


class ConfigError(ValueError):
    """A monitor configuration names something unknown or has a value it cannot use."""


def _canonical(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def check_detector(name: str, allowed: Sequence[str], what: str) -> str:
    """The canonical detector name, or a ConfigError naming the unknown one."""
    canon = _canonical(name)
    aliases = {"ph": "page_hinkley", "pagehinkley": "page_hinkley", "hddma": "hddm_a", "hddmw": "hddm_w"}
    canon = aliases.get(canon, canon)
    if canon not in allowed:
        raise ConfigError(f"unknown detector {name!r} for {what}; choose one of: {', '.join(allowed)}")
    return canon


class MeanShiftDetector:
    """A River change detector on a standardised block statistic.

    The monitor averages the standard scores of a feature over a block of predictions
    and feeds `mean * sqrt(count)`, which is N(0, 1) while nothing changes, so one
    significance level means the same thing for every feature.

    Parameters
    ----------
    detector
        "adwin" (default), "page_hinkley" or "kswin". Measured here on unit-variance
        blocks of 16 at delta = 1e-3/21: ADWIN finds a 1 sd shift in a median 44
        predictions, Page-Hinkley in 64, KSWIN in ~290 at ~1 ms per update (too slow
        for the 50k/s target: select it for low-volume models only).
    delta
        Significance level of this one detector (the monitor splits its family-wise
        budget across features). ADWIN's delta, KSWIN's alpha; Page-Hinkley gets the
        CUSUM threshold log(1/delta) + 2 with drift allowance 0.5.
    seed
        Seeds KSWIN's sampling.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(7)
    >>> detector = MeanShiftDetector("adwin", delta=1e-4)
    >>> blocks = [rng.gauss(0, 1) for _ in range(300)] + [rng.gauss(4, 1) for _ in range(20)]
    >>> [i for i, y in enumerate(blocks) if detector.update(y)][:1]
    [301]

    """

    def __init__(self, detector: str = "adwin", delta: float = 5e-5, seed: int = 0):
        self.detector = check_detector(detector, NUMERIC_DETECTORS, "numeric values")
        if not 0 < delta < 1:
            raise ConfigError(f"detector significance must be in (0, 1), got {delta}")
        self.delta = delta
        self.seed = seed
        self._gain = 1.0
        if self.detector == "adwin":
            self._river = drift.ADWIN(delta=delta, clock=1, min_window_length=1, grace_period=5)
            self._gain = _ADWIN_GAIN
        elif self.detector == "page_hinkley":
            # no fading (alpha=1): with River's default 1 - 1e-4 the sums saturate and,
            # measured here, a false alarm came every ~15k blocks whatever the threshold
            self._river = drift.PageHinkley(
                min_instances=30, delta=0.5, threshold=math.log(1 / delta) + 2.0, alpha=1.0
            )
        else:
            self._river = drift.KSWIN(alpha=delta, window_size=100, stat_size=30, seed=seed)

    def update(self, y: float) -> bool:
        """Feed one block statistic; True when the detector signals a change."""
        river = self._river
        river.update(y * self._gain)
        return river.drift_detected

    def level(self) -> float | None:
        """Mean block statistic of the detector's current window (ADWIN: after a change, the part
        after it); None for detectors that keep no such window."""
        if self.detector != "adwin" or not self._river.width:
            return None
        return float(self._river.estimation) / self._gain


class ErrorRateDetector:
    """A River detector on labelled outcomes: 1 = the prediction was wrong, 0 = right.

    Parameters
    ----------
    detector
        "adwin" (default), "hddm_a", "hddm_w", "ddm", "eddm" or "fhddm". FHDDM expects
        1 = correct, so it is fed the complement. EDDM has no significance knob and is
        noisy (about 30 false alarms per 100,000 outcomes at a 0.15 error rate, measured
        here); DDM judges against the lowest rate it has seen and false-alarms about once
        in its first few thousand outcomes after every reset.
    delta
        One-sided significance level: twice ADWIN's delta (ADWIN tests both directions),
        HDDM's drift confidence, FHDDM's confidence level divided by 1000, DDM's threshold
        as the one-sided normal quantile of delta.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(3)
    >>> detector = ErrorRateDetector("adwin", delta=1e-3)
    >>> outcomes = [int(rng.random() < 0.1) for _ in range(3000)] + [int(rng.random() < 0.4) for _ in range(500)]
    >>> [i for i, wrong in enumerate(outcomes) if detector.update(wrong)][:1]
    [3057]

    """

    def __init__(self, detector: str = "adwin", delta: float = 1e-3):
        self.detector = check_detector(detector, ERROR_DETECTORS, "labelled outcomes")
        if not 0 < delta < 1:
            raise ConfigError(f"detector significance must be in (0, 1), got {delta}")
        self.delta = delta
        self._invert = self.detector == "fhddm"
        name = self.detector
        if name == "adwin":
            # ADWIN tests both ways; only a rise is acted on, so it runs at twice the level
            self._river = drift.ADWIN(delta=min(2 * delta, 0.5), clock=1)
        elif name == "hddm_a":
            self._river = binary.HDDMA(drift_confidence=delta, warning_confidence=min(0.5, 5 * delta))
        elif name == "hddm_w":
            self._river = binary.HDDMW(drift_confidence=delta, warning_confidence=min(0.5, 5 * delta))
        elif name == "ddm":
            # DDM compares with the lowest error rate it has seen; with River's warm start of
            # 30 a lucky error-free start made a false alarm within 100 outcomes here
            self._river = binary.DDM(warm_start=300, drift_threshold=float(-special.ndtri(delta)))
        elif name == "eddm":
            self._river = binary.EDDM()
        else:
            # FHDDM tests every outcome against a 100-outcome window: at confidence delta
            # it raised 26 false alarms per 100k here, at delta / 1000 (River's default 1e-6
            # for delta = 1e-3) none
            self._river = binary.FHDDM(confidence_level=delta / 1000)

    def update(self, wrong: int) -> bool:
        """Feed one outcome; True when the detector signals a change in the error rate."""
        river = self._river
        river.update(1 - wrong if self._invert else wrong)
        return river.drift_detected

    def level(self) -> float | None:
        """Error rate of the detector's current window (ADWIN: after a change, the part after
        it); None for detectors that keep no such window."""
        if self.detector != "adwin" or not self._river.width:
            return None
        return float(self._river.estimation)


def rewarm(detector: MeanShiftDetector | ErrorRateDetector, summary: dict[str, float], seed: int,
           cap: int = 2000) -> None:
    """Refill a fresh detector from the summary of what it had seen, quietly.

    River keeps its windows in objects we do not serialise (no pickle): a restart feeds
    the new detector synthetic values with the persisted count, mean and spread (normal
    for block statistics, Bernoulli for outcomes), so it compares new data against the
    level it had learned instead of starting blind. Signals during the refill are dropped.
    """
    if isinstance(detector, MeanShiftDetector) and detector.detector == "kswin":
        cap = min(cap, 100)  # KSWIN only keeps its last 100 values, at ~1 ms each
    n = int(min(summary.get("n", 0), cap))
    if n <= 0:
        return
    rng = random.Random(seed)
    mean, sd = float(summary.get("mean", 0.0)), float(summary.get("sd", 1.0))
    if isinstance(detector, ErrorRateDetector):
        for _ in range(n):
            detector.update(int(rng.random() < mean))
    else:
        for _ in range(n):
            detector.update(rng.gauss(mean, sd))


class StandardScores:
    """Maps numeric columns to standard scores against a reference sample.

    "quantile" (default) takes each value's mid-rank in the reference, turns it into a
    normal score and standardises that; "zscore" uses the reference mean and standard
    deviation. Heavy tails make z-scored block means skewed: on log-normal features it
    raised 6 to 35 false alarms per 100,000 predictions per feature where normal scores
    raised none (measured here), so quantile is the default. Missing values stay NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = StandardScores("quantile").fit(rng.lognormal(size=(2000, 2)))
    >>> z = scores.transform(rng.lognormal(size=(4000, 2)))
    >>> [round(float(v), 1) for v in z.mean(axis=0)], [round(float(v), 1) for v in z.std(axis=0)]
    ([0.0, 0.0], [1.0, 1.0])

    """

    GRID = 512
    _CLIP = 1e6
    _STRIDE = 4e6

    def __init__(self, method: str = "quantile"):
        method = _canonical(method)
        if method not in STANDARDISATIONS:
            raise ConfigError(f"unknown standardisation {method!r}; choose one of: {', '.join(STANDARDISATIONS)}")
        self.method = method
        self.fitted = False

    def fit(self, X: np.ndarray, columns: Sequence[int] | None = None, width: int | None = None) -> "StandardScores":
        """Learn the reference from X. With `columns`, X holds only those columns of `width`
        and the others keep their reference (a new model version re-learns its score alone)."""
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        if columns is None or not self.fitted:
            F = X.shape[1] if columns is None else int(width or max(columns) + 1)
            self.loc = np.zeros(F)
            self.scale = np.ones(F)
            self.usable = np.zeros(F, dtype=bool)
            self.grid = np.zeros((F, self.GRID))
            self.post_loc = np.zeros(F)
            self.post_scale = np.ones(F)
        columns = list(range(X.shape[1])) if columns is None else list(columns)
        levels = (np.arange(self.GRID) + 0.5) / self.GRID
        for i, j in enumerate(columns):
            col = X[:, i]
            col = col[np.isfinite(col)]
            self.usable[j] = len(col) >= 2
            if not self.usable[j]:
                self.loc[j], self.scale[j], self.grid[j] = 0.0, 1.0, 0.0
                continue
            self.loc[j] = col.mean()
            sd = col.std()
            # a constant reference: any other value is a change worth seeing
            self.scale[j] = sd if sd > 1e-12 * max(1.0, abs(self.loc[j])) else max(1e-9, 1e-9 * abs(self.loc[j]))
            self.grid[j] = np.quantile(col, levels, method="inverted_cdf")
        self._prepare()
        self.fitted = True
        if self.method == "quantile":
            full = np.full((len(X), len(self.loc)), np.nan)
            full[:, columns] = X
            Z = self._normal_scores(full)
            for j in columns:
                col = Z[:, j][np.isfinite(Z[:, j])]
                self.post_loc[j], self.post_scale[j] = (col.mean(), max(col.std(), 1e-6)) if len(col) >= 2 else (0.0, 1.0)
            self._prepare()
        return self

    def _prepare(self) -> None:
        F, R = len(self.loc), self.GRID
        self._inv = 1.0 / self.scale
        self._zshift = -self.loc / self.scale
        # keys: column j's standardised values moved into their own band around j * STRIDE,
        # so one sorted array and one searchsorted serve every column at once
        offsets = np.arange(F) * self._STRIDE
        self._shift = offsets + self._zshift
        self._kmin, self._kmax = offsets - self._CLIP, offsets + self._CLIP
        keys = np.clip((self.grid - self.loc[:, None]) / self.scale[:, None], -self._CLIP, self._CLIP)
        self._keys = (keys + offsets[:, None]).ravel()
        self._keys_padded = np.append(self._keys, np.nan)
        self._tie_end = np.append(np.searchsorted(self._keys, self._keys, "right"), len(self._keys))
        self._col = np.arange(F)
        # normal score of each mid-rank 0..2R, one row per column, flattened
        u = np.arange(2 * R + 1) / (2 * R)
        table = special.ndtri(np.clip(u, 0.5 / R, 1 - 0.5 / R))
        self._raw = np.tile(table, F)
        self._flat = ((table[None, :] - self.post_loc[:, None]) / self.post_scale[:, None]).ravel()

    def _flat_index(self, X: np.ndarray) -> np.ndarray:
        keys = X * self._inv
        keys += self._shift
        np.minimum(keys, self._kmax, out=keys)
        np.maximum(keys, self._kmin, out=keys)
        left = np.searchsorted(self._keys, keys, "left")
        # mid-rank needs the right end of a run of ties too: look it up instead of searching again
        right = np.where(self._keys_padded[left] == keys, self._tie_end[left], left)
        # (left - jR) + (right - jR) + j(2R + 1): the mid-rank's slot in column j's row.
        # NaN sorts last and lands on some valid slot: callers mask it.
        left += right
        left += self._col
        return left

    def _normal_scores(self, X: np.ndarray) -> np.ndarray:
        Z = self._raw[self._flat_index(X)]
        Z[np.isnan(X)] = np.nan
        return Z

    def transform_unmasked(self, X: np.ndarray) -> np.ndarray:
        """`transform` without restoring NaN: where X is NaN the result is meaningless."""
        if self.method == "zscore":
            Z = X * self._inv
            Z += self._zshift
            return Z
        return self._flat[self._flat_index(X)]

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Standard scores of X (rows = observations, columns as fitted); NaN stays NaN."""
        Z = self.transform_unmasked(np.asarray(X, dtype=float))
        Z[np.isnan(X)] = np.nan
        return Z

    def state_dict(self) -> dict[str, Any]:
        if not self.fitted:
            return {"method": self.method, "fitted": False}
        return {
            "method": self.method, "fitted": True, "loc": self.loc.tolist(), "scale": self.scale.tolist(),
            "usable": self.usable.tolist(), "grid": self.grid.tolist(),
            "post_loc": self.post_loc.tolist(), "post_scale": self.post_scale.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> "StandardScores":
        self.method = state["method"]
        self.fitted = bool(state.get("fitted"))
        if self.fitted:
            self.loc = np.asarray(state["loc"], dtype=float)
            self.scale = np.asarray(state["scale"], dtype=float)
            self.usable = np.asarray(state["usable"], dtype=bool)
            self.grid = np.asarray(state["grid"], dtype=float).reshape(len(self.loc), self.GRID)
            self.post_loc = np.asarray(state["post_loc"], dtype=float)
            self.post_scale = np.asarray(state["post_scale"], dtype=float)
            self._prepare()
        return self


class FrequencyShift:
    """Chi-square test of a categorical feature's recent frequencies against its reference.

    Categories are the reference's most frequent ones plus one "other" bucket (rarer and
    unseen values); `update` adds a block of category codes and, every `window`
    observations, tests the 2 x k table (reference vs window), pooling cells whose
    expected count is under 5. A two-sample test, so a finite reference does not inflate
    false alarms.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> shift = FrequencyShift(reference_counts=[600, 300, 100], alpha=1e-4, window=500)
    >>> shift.update(rng.choice(3, size=500, p=[0.6, 0.3, 0.1]))
    False
    >>> shift.update(rng.choice(3, size=500, p=[0.4, 0.3, 0.3]))
    True
    >>> round(shift.statistic) > shift.threshold
    True

    """

    def __init__(self, reference_counts: Iterable[int], alpha: float = 1e-4, window: int = 1000):
        self.reference = np.asarray(list(reference_counts), dtype=float)
        self.alpha = alpha
        self.window = window
        self.counts = np.zeros(len(self.reference))
        self.statistic = 0.0
        self.threshold = float("inf")
        self.psi = 0.0

    def update(self, codes: np.ndarray) -> bool:
        """Add category codes (0..k-1); True when a completed window differs from the reference."""
        self.counts += np.bincount(codes, minlength=len(self.reference))[: len(self.reference)]
        if self.counts.sum() < self.window:
            return False
        window, self.counts = self.counts, np.zeros(len(self.reference))
        return self._test(window)

    def _test(self, window: np.ndarray) -> bool:
        ref = self.reference
        n_ref, n_win = ref.sum(), window.sum()
        if n_ref <= 0 or n_win <= 0:
            return False
        total = ref + window
        expected_win = total * n_win / (n_ref + n_win)
        expected_ref = total * n_ref / (n_ref + n_win)
        keep = np.minimum(expected_win, expected_ref) >= 5
        if (~keep).any():
            # pool sparse cells so the chi-square approximation holds
            r = np.append(ref[keep], ref[~keep].sum())
            w = np.append(window[keep], window[~keep].sum())
        else:
            r, w = ref, window
        nonzero = (r + w) > 0
        r, w = r[nonzero], w[nonzero]
        if len(r) < 2:
            return False
        table = np.vstack([r, w])
        expected = table.sum(0) * table.sum(1)[:, None] / table.sum()
        self.statistic = float(((table - expected) ** 2 / expected).sum())
        self.threshold = float(stats.chi2.isf(self.alpha, len(r) - 1))
        p, q = (r + 0.5) / (r.sum() + 0.5 * len(r)), (w + 0.5) / (w.sum() + 0.5 * len(w))
        self.psi = float(((q - p) * np.log(q / p)).sum())
        return self.statistic > self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.tolist(), "counts": self.counts.tolist()}

    def load_state(self, state: dict[str, Any]) -> "FrequencyShift":
        self.reference = np.asarray(state["reference"], dtype=float)
        self.counts = np.asarray(state["counts"], dtype=float)
        return self


class RateRule:
    """A data-quality rule: the rate of bad values per subject over a window stays under a limit.

    The limit is the reference rate plus the larger of `margin` and `z` standard errors
    (window and reference sizes both counted; both may be given per subject), so a feature
    that is often missing in the reference does not alert on noise. `update` adds counts for a block and, once
    `window` observations are in, returns which subjects broke their limit.

    Examples
    --------
    >>> import numpy as np
    >>> missing = RateRule(reference_rates=[0.0, 0.2], reference_size=2000, margin=0.05, window=1000)
    >>> missing.update(np.array([10, 210]), 1000).tolist()
    [False, False]
    >>> missing.update(np.array([120, 200]), 1000).tolist()
    [True, False]

    """

    def __init__(self, reference_rates: Iterable[float], reference_size: int,
                 margin: float | Sequence[float] = 0.05, window: int = 1000, z: float | Sequence[float] = 5.0):
        self.reference = np.asarray(list(reference_rates), dtype=float)
        self.reference_size = max(1, int(reference_size))
        self.margin = np.asarray(margin, dtype=float)
        self.window = window
        self.z = np.asarray(z, dtype=float)
        self.bad = np.zeros(len(self.reference))
        self.seen = 0
        self.rates = np.zeros(len(self.reference))
        self.limits = self.limit(window)

    def limit(self, n: int) -> np.ndarray:
        p = self.reference
        se = np.sqrt(np.maximum(p * (1 - p), 1e-12) * (1 / max(n, 1) + 1 / self.reference_size))
        return p + np.maximum(self.margin, self.z * se)

    def update(self, bad: np.ndarray, seen: int) -> np.ndarray:
        """Add bad-value counts over `seen` observations; at a window's end, the subjects over their limit."""
        self.bad += bad
        self.seen += seen
        if self.seen < self.window:
            return np.zeros(len(self.reference), dtype=bool)
        self.rates = self.bad / self.seen
        self.limits = self.limit(self.seen)
        self.bad = np.zeros(len(self.reference))
        self.seen = 0
        return self.rates > self.limits

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.tolist(), "reference_size": self.reference_size,
                "bad": self.bad.tolist(), "seen": self.seen}

    def load_state(self, state: dict[str, Any]) -> "RateRule":
        self.reference = np.asarray(state["reference"], dtype=float)
        self.reference_size = int(state["reference_size"])
        self.bad = np.asarray(state["bad"], dtype=float)
        self.seen = int(state["seen"])
        self.limits = self.limit(self.window)
        return self
