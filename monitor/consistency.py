"""Online/offline consistency: per feature, how often the served value equals its offline recomputation.

Owns `ConsistencyRate` (`observe` a judged value, `alerts` when a feature's rate drops below the
threshold) and `ConsistencyMetrics` (its Prometheus gauges). Who recomputes is not its business:
the caller judges each value and hands over the verdict.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

from freshet.contracts import DriftAlert
from freshet.exporter import MetricsEndpoint

DETECTOR = "consistency"


@dataclass
class _FeatureCount:
    compared: int = 0
    matched: int = 0
    recent: deque = field(default_factory=deque)  # last verdicts, True = consistent
    recent_matched: int = 0
    alerting: bool = False


class ConsistencyRate:
    """Per feature: values compared and consistent, over the run and over the last `window`.

    A feature's rate over its last `window` comparisons below `min_rate` (once at least
    `min_compared` were made) raises one `data_quality` alert; it raises again only after
    the rate has come back to `min_rate` or above.

    >>> rate = ConsistencyRate(min_rate=0.9, window=10, min_compared=5)
    >>> for ok in [True] * 5 + [False] * 2:
    ...     rate.observe("v:count_x_300s", ok)
    >>> rate.rate("v:count_x_300s"), rate.overall()
    (0.7142857142857143, 0.7142857142857143)
    >>> [(a.kind, a.subject, round(a.statistic, 3)) for a in rate.alerts("fraud", "3", ts=100.0)]
    [('data_quality', 'v:count_x_300s', 0.714)]
    >>> rate.alerts("fraud", "3", ts=101.0)   # still low: said already
    []
    """

    def __init__(self, min_rate: float = 0.99, window: int = 1000, min_compared: int = 50):
        self.min_rate = min_rate
        self.window = window
        self.min_compared = min_compared
        self.features: dict[str, _FeatureCount] = {}

    def observe(self, feature: str, consistent: bool) -> None:
        c = self.features.get(feature)
        if c is None:
            c = self.features[feature] = _FeatureCount()
        c.compared += 1
        c.matched += bool(consistent)
        c.recent.append(bool(consistent))
        c.recent_matched += bool(consistent)
        if len(c.recent) > self.window:
            c.recent_matched -= c.recent.popleft()

    def rate(self, feature: str) -> float | None:
        """The feature's rate over its last `window` comparisons (None before any)."""
        c = self.features.get(feature)
        return c.recent_matched / len(c.recent) if c and c.recent else None

    def overall(self) -> float | None:
        """Consistent values over compared values, every feature, the whole run."""
        compared = self.compared()
        return sum(c.matched for c in self.features.values()) / compared if compared else None

    def compared(self) -> int:
        return sum(c.compared for c in self.features.values())

    def alerts(self, model: str, model_version: str, ts: float) -> list[DriftAlert]:
        """One alert per feature whose recent rate fell below `min_rate` since it last did."""
        out = []
        for feature, c in self.features.items():
            rate = self.rate(feature)
            if rate is None or len(c.recent) < self.min_compared:
                continue
            if rate >= self.min_rate:
                c.alerting = False
            elif not c.alerting:
                c.alerting = True
                alert_id = hashlib.blake2b(f"{model}|{feature}|consistency|{c.compared}".encode(),
                                           digest_size=16).hexdigest()
                out.append(DriftAlert(alert_id, model, str(model_version), "data_quality", feature, DETECTOR,
                                      rate, self.min_rate, len(c.recent), ts))
        return out

    def summary(self) -> dict:
        """Rates and counts per feature and overall, for logs and reports."""
        return {"consistency_rate": self.overall(), "features_compared": self.compared(),
                "features": {f: {"compared": c.compared, "matched": c.matched, "recent_rate": self.rate(f)}
                             for f, c in sorted(self.features.items())}}


class ConsistencyMetrics(MetricsEndpoint):
    """Prometheus metrics of the consistency check, in their own registry."""

    def __init__(self):
        from prometheus_client import Counter, Gauge

        super().__init__()
        self.rate = Gauge("freshet_consistency_rate", "Served feature values equal to their offline "
                          "recomputation, last comparisons per feature", ["feature"], registry=self.registry)
        self.overall = Gauge("freshet_consistency_rate_overall", "Served feature values equal to their offline "
                             "recomputation, every feature since start", registry=self.registry)
        self.values = Counter("freshet_consistency_values", "Feature values compared, by outcome",
                              ["feature", "outcome"], registry=self.registry)
        self.pending = Gauge("freshet_consistency_pending", "Sampled predictions waiting for the raw log",
                             registry=self.registry)

    def observe(self, feature: str, consistent: bool) -> None:
        self.values.labels(feature, "consistent" if consistent else "different").inc()

    def update(self, rate: ConsistencyRate, pending: int) -> None:
        for feature in rate.features:
            value = rate.rate(feature)
            if value is not None:
                self.rate.labels(feature).set(value)
        overall = rate.overall()
        if overall is not None:
            self.overall.set(overall)
        self.pending.set(pending)
