"""Scoring models on the holdout, and the promotion rule.

Owns the metrics, `score_on_holdout` and `score_out_of_fold` (candidate and `Champion` on the same rows),
`bootstrap_gains`, `decide_promotion`.

The candidate and the current champion are scored on the same holdout (or, out-of-fold, on
every row: the candidate's score of a row comes from a fit on the other blocks), and the candidate
is promoted only if it beats the champion by `margin` on `metric` and the gain is above
zero at `confidence`. Either way the decision carries its reason, in a sentence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from freshet.training.dataset import FeaturePlan, TrainingSet
from freshet.training.pipeline import input_matrix

log = logging.getLogger("freshet.retrain")

# metric -> True when higher is better
METRICS = {"auc": True, "log_loss": False, "error_rate": False}
FALLBACK_METRIC = "log_loss"  # AUC is undefined on a one-class holdout; log loss never is


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, log loss and error rate (at `threshold`) of probabilities `p` for 0/1 outcomes `y`.

    >>> m = evaluate(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    >>> m["auc"], m["error_rate"]
    (0.75, 0.5)
    """
    y = np.asarray(y, dtype=float)
    p = np.clip(np.asarray(p, dtype=float), 1e-15, 1 - 1e-15)
    n = len(y)
    positives = float(y.sum())
    out = {"rows": float(n), "positive_rate": positives / n if n else math.nan}
    out["log_loss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if n else math.nan
    out["error_rate"] = float(np.mean((p > threshold) != (y > 0.5))) if n else math.nan
    if 0 < positives < n:
        from sklearn.metrics import roc_auc_score

        out["auc"] = float(roc_auc_score(y, p))
    else:
        out["auc"] = math.nan
    return out


@dataclass(frozen=True)
class Decision:
    """Whether the candidate replaces the champion, and why, in a sentence."""

    promote: bool
    reason: str
    metric: str = ""
    improvement: float | None = None


def decide_promotion(candidate: Mapping[str, float], champion: Mapping[str, float] | None,
                     metric: str = "auc", margin: float = 0.005,
                     gains: Mapping[str, np.ndarray] | None = None, confidence: float = 0.95,
                     judged_on: str = "the same holdout") -> Decision:
    """Promote only when the candidate beats the champion by `margin` on `metric` (same rows: `judged_on`
    says which, for the reason) and, given bootstrap `gains` of that metric, the gain is above zero at
    `confidence`.

    If `metric` is undefined for either (AUC on a one-class holdout), log loss decides.

    >>> decide_promotion({"auc": 0.86}, {"auc": 0.80}).promote
    True
    >>> d = decide_promotion({"auc": 0.803}, {"auc": 0.80})
    >>> d.promote, d.reason
    (False, 'auc 0.8030 vs champion 0.8000 on the same holdout: +0.0030 < margin 0.0050')
    >>> noisy = {"auc": np.array([-0.02, 0.0, 0.01, 0.02, 0.03])}
    >>> decide_promotion({"auc": 0.81}, {"auc": 0.80}, gains=noisy).reason
    'auc 0.8100 vs champion 0.8000 on the same holdout: +0.0100 >= margin 0.0050 but not significant (95% lower bound -0.0160)'
    >>> decide_promotion({"log_loss": 0.20}, {"log_loss": 0.30}, metric="log_loss").promote
    True
    >>> decide_promotion({"auc": 0.7}, None).reason
    'no champion to compare with'
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if champion is None:
        return Decision(True, "no champion to compare with")
    for name in dict.fromkeys([metric, FALLBACK_METRIC]):
        c, b = candidate.get(name, math.nan), champion.get(name, math.nan)
        if c is None or b is None or not (math.isfinite(c) and math.isfinite(b)):
            continue
        gain = (c - b) if METRICS[name] else (b - c)
        note = "" if name == metric else f" ({metric} undefined on this holdout)"
        verdict = ">=" if gain >= margin else "<"
        reason = (f"{name} {c:.4f} vs champion {b:.4f} on {judged_on}: {gain:+.4f} {verdict} "
                  f"margin {margin:.4f}{note}")
        promote = gain >= margin
        boot = None if gains is None else gains.get(name)
        if promote and boot is not None and len(boot):
            low = float(np.quantile(boot, 1 - confidence))
            if low <= 0:
                promote = False
                reason += f" but not significant ({confidence:.0%} lower bound {low:+.4f})"
        return Decision(promote, reason, name, gain)
    return Decision(False, f"neither {metric} nor {FALLBACK_METRIC} is defined for both models on the holdout")


def _auc_rows(scores: np.ndarray, y: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` (Mann-Whitney: mean rank of the positives, ties averaged)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1, method="average")
    neg = y.shape[1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * y).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)


def bootstrap_gains(y: np.ndarray, p_candidate: np.ndarray, p_champion: np.ndarray, metrics: Iterable[str],
                    rounds: int = 200, seed: int = 0, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Paired bootstrap of the candidate's gain over the champion (positive = better), per metric.

    Both models are scored on the same resampled rows, so what the holdout's luck does to
    one it does to the other: the spread is that of the difference.
    """
    y = np.asarray(y, dtype=float)
    pc = np.clip(np.asarray(p_candidate, dtype=float), 1e-15, 1 - 1e-15)
    pb = np.clip(np.asarray(p_champion, dtype=float), 1e-15, 1 - 1e-15)
    n = len(y)
    out: dict[str, np.ndarray] = {}
    if n == 0:
        return out
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    for name in dict.fromkeys(metrics):
        if name == "log_loss":
            loss_c = -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
            loss_b = -(y * np.log(pb) + (1 - y) * np.log(1 - pb))
            out[name] = (loss_b - loss_c)[idx].mean(axis=1)
        elif name == "error_rate":
            err_c = ((pc > threshold) != (y > 0.5)).astype(float)
            err_b = ((pb > threshold) != (y > 0.5)).astype(float)
            out[name] = (err_b - err_c)[idx].mean(axis=1)
        elif name == "auc":
            yy = y[idx]
            pos = yy.sum(axis=1)
            ok = (pos > 0) & (pos < n)  # a resample with one class has no AUC
            out[name] = (_auc_rows(pc[idx], yy, pos) - _auc_rows(pb[idx], yy, pos))[ok]
    return out


def rounded(metrics: Mapping[str, float] | None) -> dict[str, float | None] | None:
    """Metrics as an outcome shows them: six decimals, None where undefined (JSON has no NaN)."""
    if metrics is None:
        return None
    return {k: (round(v, 6) if math.isfinite(v) else None) for k, v in metrics.items()}


@dataclass(frozen=True)
class Champion:
    """The version serving now, which a candidate must beat, and its model when it loads."""

    version: str | None
    model: Any = None  # a freshet.models.LinearModel

    @classmethod
    def load(cls, models: Any, name: str, version: str | None) -> "Champion":
        """From the model registry (`freshet.models.ModelRegistry`); a champion that will not load has no model."""
        if version is None:
            return cls(None)
        try:
            return cls(version, models.load(name, version))
        except Exception as exc:  # noqa: BLE001 - an unreadable champion must not block a retrain
            log.warning("could not load champion %s version %s: %s", name, version, exc)
            return cls(version)

    def extra_inputs(self, plan: FeaturePlan) -> list[str]:
        """Its features the service no longer lists but the registry still has: computed too, so it can be scored."""
        names = self.model.feature_names if self.model else []
        return [r for r in names if ":" in r and r not in plan.refs and plan.knows(r)]


@dataclass
class HoldoutScores:
    """The candidate's and the champion's probabilities and metrics on the same holdout outcomes `y`.

    The champion's are None when there is none or it could not be scored (`champion_note` says why).
    """

    y: np.ndarray
    p_candidate: np.ndarray
    candidate: dict[str, float]
    p_champion: np.ndarray | None = None
    champion: dict[str, float] | None = None
    champion_note: str = ""

    def gains(self, metrics: Iterable[str], rounds: int, seed: int) -> dict[str, np.ndarray]:
        """The candidate's bootstrapped gains over the champion (see `bootstrap_gains`)."""
        assert self.p_champion is not None, "the champion was not scored"
        return bootstrap_gains(self.y, self.p_candidate, self.p_champion, metrics, rounds, seed)

    def describe_champion(self, version: str | None) -> str:
        """How the champion did, for the log: "; champion v2 auc ...", or why it has no scores."""
        c = self.champion
        if c:
            return f"; champion v{version} auc {c['auc']:.4f} log_loss {c['log_loss']:.4f} error {c['error_rate']:.4f}"
        return f"; {self.champion_note}" if self.champion_note else "; no champion yet"


def score_on_holdout(candidate: Any, champion: Champion, training: TrainingSet, plan: FeaturePlan) -> HoldoutScores:
    """The candidate's and the champion's scores on the training set's holdout.

    The champion is scored only if it loaded and the registry still has every feature it reads.
    """
    p = candidate.predict_proba(training.X[training.holdout].tolist())
    return _with_champion(training.y[training.holdout], p, champion, training, training.holdout, plan)


def out_of_fold(training: TrainingSet, fit: Callable[[np.ndarray], Any]) -> np.ndarray:
    """Every row's probability from a model fitted on the other blocks (`training.folds`).

    `fit(rows)` fits on the rows of that mask and returns a model with `predict_proba(rows)`
    answering one probability per row (as `freshet.models.LinearModel` does, like serving).
    """
    assert training.folds is not None, "the training set was not cut into folds"
    p = np.full(len(training.y), np.nan)
    for k in range(training.n_folds):
        block = training.folds == k
        p[block] = fit(~block).predict_proba(training.X[block].tolist())
    return p


def score_out_of_fold(p_candidate: np.ndarray, champion: Champion, training: TrainingSet,
                      plan: FeaturePlan) -> HoldoutScores:
    """The candidate's out-of-fold probabilities (`out_of_fold`) and the champion's on the same rows: all of them."""
    rows = training.judged
    return _with_champion(training.y[rows], np.asarray(p_candidate)[rows], champion, training, rows, plan)


def _with_champion(y: np.ndarray, p: np.ndarray, champion: Champion, training: TrainingSet, rows: np.ndarray,
                   plan: FeaturePlan) -> HoldoutScores:
    """The candidate's probabilities `p` on `rows`, with the champion's there when it can be scored."""
    scores = HoldoutScores(y, p, evaluate(y, p))
    model = champion.model
    if model is None:
        return scores
    missing = [r for r in model.feature_names if ":" in r and not plan.knows(r)]
    if missing:
        scores.champion_note = (f"champion version {champion.version} reads feature(s) the registry no longer "
                                f"has ({', '.join(missing[:5])}); it cannot be scored")
    else:
        scores.p_champion = model.predict_proba(input_matrix(training.data[rows], model.feature_names).tolist())
        scores.champion = evaluate(y, scores.p_champion)
    return scores
