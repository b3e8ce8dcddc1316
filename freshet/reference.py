"""What a model version was trained on, in a few kilobytes: `TrainingReference`, logged with the version.

Training builds it (quantiles, bounds, missing rates, category frequencies of every input and of the score);
the monitor judges the version's traffic against it from its first prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

FORMAT = "freshet.reference/1"
FILE = "reference.json"
LEVELS = 128        # quantile levels kept per numeric input: (i + 0.5) / LEVELS
MAX_CATEGORIES = 30


def _round(x: float) -> float | None:
    """Six significant digits (what a JSON reference needs); NaN and infinities become None."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


@dataclass
class NumericReference:
    """One numeric input (or the score): its quantiles, bounds and missing rate over `n` rows."""

    quantiles: list[float]
    low: float | None
    high: float | None
    missing_rate: float
    n: int
    window_s: float | None = None   # the feature's window, for a windowed aggregation
    full: bool = True               # whether every training row had a full window behind it

    @classmethod
    def of(cls, values: np.ndarray, window_s: float | None = None, full: bool = True,
           bounds_from: np.ndarray | None = None) -> "NumericReference":
        """From a column of values; `bounds_from` (a larger sample, say) widens the bounds."""
        v = np.asarray(values, dtype=float)
        ok = v[np.isfinite(v)]
        n = len(v)
        if len(ok) == 0:
            return cls([], None, None, 1.0 if n else 0.0, n, window_s, full)
        levels = (np.arange(LEVELS) + 0.5) / LEVELS
        q = np.quantile(ok, levels, method="inverted_cdf")
        lo, hi = ok.min(), ok.max()
        if bounds_from is not None:
            more = np.asarray(bounds_from, dtype=float)
            more = more[np.isfinite(more)]
            if len(more):
                lo, hi = min(lo, more.min()), max(hi, more.max())
        return cls([_round(x) for x in q], _round(lo), _round(hi), round(1 - len(ok) / n, 6), n, window_s, full)

    def sample(self) -> np.ndarray:
        """The quantiles as an equally weighted sample of the distribution (NaN when none)."""
        return np.array([np.nan if x is None else x for x in self.quantiles], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        return {"quantiles": self.quantiles, "low": self.low, "high": self.high, "missing_rate": self.missing_rate,
                "n": self.n, "window_s": self.window_s, "full": self.full}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "NumericReference":
        return cls(list(d.get("quantiles", [])), d.get("low"), d.get("high"), float(d.get("missing_rate", 0.0)),
                   int(d.get("n", 0)), d.get("window_s"), bool(d.get("full", True)))


@dataclass
class CategoricalReference:
    """One categorical input: the shares of its most frequent values (the rest is "other") and missing rate."""

    shares: dict[str, float]
    other: float
    missing_rate: float
    n: int

    @classmethod
    def of(cls, values: Sequence[Any]) -> "CategoricalReference":
        n = len(values)
        valid = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        counts: dict[str, int] = {}
        for v in valid:
            counts[str(v)] = counts.get(str(v), 0) + 1
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]
        m = max(1, len(valid))
        shares = {k: round(c / m, 6) for k, c in top}
        return cls(shares, round(1 - sum(c for _, c in top) / m, 6) if valid else 0.0,
                   round(1 - len(valid) / n, 6) if n else 0.0, n)

    def to_dict(self) -> dict[str, Any]:
        return {"shares": self.shares, "other": self.other, "missing_rate": self.missing_rate, "n": self.n}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CategoricalReference":
        return cls(dict(d.get("shares", {})), float(d.get("other", 0.0)), float(d.get("missing_rate", 0.0)),
                   int(d.get("n", 0)))


@dataclass
class OutcomeReference:
    """How the version did on labelled rows it was not fitted on (its holdout), at its decision threshold.

    >>> OutcomeReference.of([1, 1, 0, 0, 1], [0.9, 0.2, 0.1, 0.7, 0.6], threshold=0.5).to_dict()
    {'threshold': 0.5, 'positives': 3, 'missed': 1, 'negatives': 2, 'false_alarms': 1}
    """

    threshold: float
    positives: int
    missed: int          # positives scored at or below the threshold
    negatives: int
    false_alarms: int    # negatives scored above it

    @classmethod
    def of(cls, labels: Sequence[Any], scores: Sequence[float], threshold: float = 0.5) -> "OutcomeReference":
        y = np.asarray(labels, dtype=float) == 1
        flagged = np.asarray(scores, dtype=float) > threshold
        return cls(float(threshold), int(y.sum()), int((y & ~flagged).sum()), int((~y).sum()),
                   int((~y & flagged).sum()))

    @property
    def miss_rate(self) -> float | None:
        return self.missed / self.positives if self.positives else None

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "positives": self.positives, "missed": self.missed,
                "negatives": self.negatives, "false_alarms": self.false_alarms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OutcomeReference":
        return cls(float(d.get("threshold", 0.5)), int(d.get("positives", 0)), int(d.get("missed", 0)),
                   int(d.get("negatives", 0)), int(d.get("false_alarms", 0)))


@dataclass
class TrainingReference:
    """The distributions a model version was trained on: every numeric input, categorical input and the score.

    `history_start` is the event time the stream's history began at when the version was
    trained and `examples_start`/`examples_end` bound the rows the reference describes:
    a windowed input whose window is longer than the history behind its first row is
    marked `full=False` (its values were still growing), and the monitor lets it warm up
    instead of judging it against these quantiles.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = np.column_stack([rng.normal(size=1000), rng.poisson(3.0, 1000)])
    >>> ref = TrainingReference.build(X, ["amount", "card:count_1h"], scores=rng.random(1000),
    ...                               windows={"card:count_1h": 3600}, history_start=0.0,
    ...                               row_times=np.linspace(1800.0, 7200.0, 1000))
    >>> len(ref.numeric["amount"].quantiles), ref.numeric["card:count_1h"].full, ref.score.n
    (128, False, 1000)
    >>> TrainingReference.from_dict(ref.to_dict()).numeric["amount"].low == ref.numeric["amount"].low
    True
    """

    numeric: dict[str, NumericReference]
    score: NumericReference | None = None
    categorical: dict[str, CategoricalReference] = field(default_factory=dict)
    rows: int = 0
    history_start: float | None = None
    examples_start: float | None = None
    examples_end: float | None = None
    outcomes: OutcomeReference | None = None   # the version's outcomes on its holdout, when labelled

    @classmethod
    def build(cls, X: np.ndarray, names: Sequence[str], scores: np.ndarray | None = None, *,
              windows: Mapping[str, float] | None = None, history_start: float | None = None,
              row_times: np.ndarray | None = None, bounds_from: np.ndarray | None = None,
              categorical: Mapping[str, Sequence[Any]] | None = None,
              outcomes: OutcomeReference | None = None) -> "TrainingReference":
        """The reference of rows X (columns = `names`) and their scores; the bounds cover
        `bounds_from` too (every training row, when X is only the newest of them)."""
        X = np.asarray(X, dtype=float)
        windows = dict(windows or {})
        start = end = None
        if row_times is not None and len(row_times):
            start, end = float(np.min(row_times)), float(np.max(row_times))
        behind = start - history_start if start is not None and history_start is not None else None
        numeric = {}
        for j, name in enumerate(names):
            w = windows.get(name)
            full = w is None or (behind is not None and behind >= w)
            numeric[name] = NumericReference.of(X[:, j], float(w) if w is not None else None, full,
                                                None if bounds_from is None else np.asarray(bounds_from)[:, j])
        score = NumericReference.of(np.asarray(scores, dtype=float)) if scores is not None else None
        cats = {k: CategoricalReference.of(list(v)) for k, v in (categorical or {}).items()}
        return cls(numeric, score, cats, len(X), history_start, start, end, outcomes)

    def warming(self) -> dict[str, float]:
        """Windowed inputs whose window was not full in the reference: name -> window seconds."""
        return {k: r.window_s for k, r in self.numeric.items() if not r.full and r.window_s}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "rows": self.rows, "history_start": self.history_start,
                "examples_start": self.examples_start, "examples_end": self.examples_end,
                "numeric": {k: v.to_dict() for k, v in self.numeric.items()},
                "score": self.score.to_dict() if self.score else None,
                "categorical": {k: v.to_dict() for k, v in self.categorical.items()},
                "outcomes": self.outcomes.to_dict() if self.outcomes else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainingReference":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"not a training reference: expected format {FORMAT!r}")
        return cls({k: NumericReference.from_dict(v) for k, v in d.get("numeric", {}).items()},
                   NumericReference.from_dict(d["score"]) if d.get("score") else None,
                   {k: CategoricalReference.from_dict(v) for k, v in d.get("categorical", {}).items()},
                   int(d.get("rows", 0)), d.get("history_start"), d.get("examples_start"), d.get("examples_end"),
                   OutcomeReference.from_dict(d["outcomes"]) if d.get("outcomes") else None)
