"""Label-free performance estimate: the error rate a classifier should have, from its own scores.

In the spirit of NannyML's CBPE: calibrated scores give each prediction an expected error;
their mean over a window estimates the error rate before any label arrives.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from scipy import special


class ExpectedErrorEstimate:
    """Estimated error rate from calibrated scores, updated online, with its alert rule.

    Scores fall into bins (one edge at the decision threshold, so a bin is wholly
    predicted positive or negative). A bin's positive rate comes from the first
    `calibration_labels` joined labels, shrunk towards the bin's mean score (`prior`
    pseudo-labels), so uncalibrated scores are taken at face value until labels say
    otherwise. A prediction's expected error is that rate if predicted negative, one minus
    it if predicted positive. The first `reference_size` scores form the reference; every
    `window` scores, `update` returns True when the window's estimate exceeds the
    reference estimate by more than both `min_increase` and a one-sided test at `alpha`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> estimate = ExpectedErrorEstimate(window=500, reference_size=2000, alpha=1e-3)
    >>> estimate.update(rng.beta(0.5, 3, size=2500))   # the reference, then one window
    False
    >>> round(estimate.result(), 2)
    0.13
    >>> estimate.update(rng.beta(4, 4, size=500))
    True
    >>> round(estimate.result(), 2)
    0.36

    """

    def __init__(self, decision_threshold: float = 0.5, bins: int = 20, window: int = 500,
                 reference_size: int = 2000, alpha: float = 1e-3, min_increase: float = 0.02,
                 calibration_labels: int = 2000, prior: float = 20.0):
        self.decision_threshold = float(decision_threshold)
        edges = np.union1d(np.linspace(0.0, 1.0, bins + 1), [self.decision_threshold])
        self.edges = edges
        self._edges = edges.tolist()
        self._calibrated = 0
        self.positive = edges[:-1] >= self.decision_threshold
        k = len(edges) - 1
        self.window = int(window)
        self.reference_size = int(reference_size)
        self.alpha = float(alpha)
        self.z = float(-special.ndtri(alpha))
        self.min_increase = float(min_increase)
        self.calibration_labels = int(calibration_labels)
        self.prior = float(prior)
        self.reference = np.zeros(k)
        self.reference_sums = np.zeros(k)
        self.current = np.zeros(k)
        self.label_n = np.zeros(k)
        self.label_pos = np.zeros(k)
        self.estimate = float("nan")
        self.reference_estimate = float("nan")
        self.limit = float("nan")

    def _bins(self, scores: np.ndarray) -> np.ndarray:
        bins = np.searchsorted(self.edges, scores, "right") - 1
        return np.minimum(np.maximum(bins, 0), len(self.positive) - 1)

    def calibrate(self, score: float, label: int) -> None:
        """Learn from one joined label (until `calibration_labels` have been seen)."""
        if self._calibrated >= self.calibration_labels or not 0.0 <= score <= 1.0:
            return
        b = min(max(bisect.bisect_right(self._edges, score) - 1, 0), len(self._edges) - 2)
        self._calibrated += 1
        self.label_n[b] += 1
        self.label_pos[b] += 1 if label else 0

    def expected_errors(self) -> np.ndarray:
        """Expected error of a prediction in each score bin."""
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_score = np.where(self.reference > 0, self.reference_sums / np.maximum(self.reference, 1), centres)
        rate = (self.label_pos + self.prior * mean_score) / (self.label_n + self.prior)
        return np.where(self.positive, 1.0 - rate, rate)

    def update(self, scores: np.ndarray) -> bool:
        """Add scores in [0, 1]; True when a completed window's estimated error rose significantly."""
        scores = np.asarray(scores, dtype=float)
        scores = scores[(scores >= 0.0) & (scores <= 1.0)]
        if len(scores) == 0:
            return False
        need = self.reference_size - int(self.reference.sum())
        if need > 0:
            head, scores = scores[:need], scores[need:]
            bins = self._bins(head)
            self.reference += np.bincount(bins, minlength=len(self.reference))
            self.reference_sums += np.bincount(bins, weights=head, minlength=len(self.reference))
            if len(scores) == 0:
                return False
        self.current += np.bincount(self._bins(scores), minlength=len(self.current))
        n = self.current.sum()
        if n < self.window:
            return False
        errors = self.expected_errors()
        n_ref = self.reference.sum()
        ref = float(self.reference @ errors / n_ref)
        var = max(float(self.reference @ errors**2 / n_ref) - ref * ref, 1e-12)
        self.estimate = float(self.current @ errors / n)
        self.reference_estimate = ref
        self.limit = ref + max(self.min_increase, self.z * float(np.sqrt(var / n + var / n_ref)))
        self.current = np.zeros(len(self.current))
        return self.estimate > self.limit

    def result(self) -> float:
        """The estimated error rate of the last completed window (NaN before the first)."""
        return self.estimate

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference.tolist(), "reference_sums": self.reference_sums.tolist(),
            "current": self.current.tolist(), "label_n": self.label_n.tolist(), "label_pos": self.label_pos.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> "ExpectedErrorEstimate":
        for name in ("reference", "reference_sums", "current", "label_n", "label_pos"):
            value = np.asarray(state[name], dtype=float)
            if value.shape != getattr(self, name).shape:
                raise ValueError(f"estimate state field {name!r} has {value.shape[0]} bins, expected {len(self.positive)}")
            setattr(self, name, value)
        self._calibrated = int(self.label_n.sum())
        return self
