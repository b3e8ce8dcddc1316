"""Prometheus metrics of one serving process: requests, feature ages, predictions, model version.

Owns the counters the request path updates and their exposition at /metrics.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from freshet.exporter import LockFreeHistogram, ProcessShare
from freshet.models import LinearModel
from freshet.serving.online import OnlineFeatureReader

LATENCY_BUCKETS = (.0001, .00025, .0005, .00075, .001, .0015, .0025, .005, .0075, .01, .025, .05, .1, .25, .5, 1, 2.5)
AGE_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 2 * 86400, 7 * 86400)


class ServingMetrics:
    """The registry /metrics exposes and the per-request counters behind it.

    Per-request metrics are plain dicts and lock-free histograms exposed by a collector:
    prometheus_client's own children cost several microseconds each (more in multiprocess
    mode, which importing feast switches on), on the path every request takes.
    """

    def __init__(self, reader: OnlineFeatureReader):
        self.reader = reader
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency: dict[str, LockFreeHistogram] = {}
        self.requests: dict[tuple[str, int], int] = {}
        self.feature_age: dict[str, LockFreeHistogram] = {}
        self.feature_rows: dict[tuple[str, str], int] = {}
        self._model_version = Gauge("freshet_model_version", "Model version in use", ["model"],
                                    registry=self.registry)
        self._model_info = Gauge("freshet_model_info", "1 for the model version in use, 0 for versions "
                                 "served before", ["model", "version"], registry=self.registry)
        self.registry.register(_RequestCollector(self))
        self.share: ProcessShare | None = None

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """One request answered."""
        hist = self.latency.get(endpoint)
        if hist is None:
            hist = self.latency[endpoint] = LockFreeHistogram(LATENCY_BUCKETS)
        hist.observe(seconds)
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_features(self, result: Any) -> None:
        """The age and status of every entity row an OnlineFeatures result read."""
        now = time.time()
        views = self.reader.layout.views
        rows = self.feature_rows
        for view, stamps in result.view_ts.items():
            hist = self.feature_age.get(view)
            if hist is None:
                hist = self.feature_age[view] = LockFreeHistogram(AGE_BUCKETS)
            ttl = views[view].ttl_s if view in views else 0
            for ts in stamps:
                if ts is None:
                    status = "not_found"
                else:
                    age = now - ts
                    hist.observe(age)
                    status = "stale" if ttl and age > ttl else "present"
                key = (view, status)
                rows[key] = rows.get(key, 0) + 1

    def model_changed(self, old: LinearModel | None, new: LinearModel) -> None:
        """The served model version changed (a ModelFollower's on_change)."""
        if old is not None:
            self._model_info.labels(old.name, old.version).set(0)
        self._model_info.labels(new.name, new.version).set(1)
        if new.version.isdigit():
            self._model_version.labels(new.name).set(int(new.version))

    def expose_predictions(self, predictor: Any) -> None:
        """Expose a Predictor's counts and its prediction log's (read when scraped: both may be replaced)."""
        self.registry.register(_PredictionCollector(predictor))

    def share_with(self, directory: str) -> ProcessShare:
        """Answer /metrics for every serving worker that shares `directory` (serve --workers N).

        The caller publishes now and then (`ProcessShare.publish`) so the other workers' answers
        include this one's counts; a scrape publishes this worker's before it answers.
        """
        # one served version per model: the highest any live worker reports
        self.share = ProcessShare(directory, self.registry,
                                  {"freshet_model_version": "livemax", "freshet_model_info": "livemax"})
        return self.share

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (of every worker, when shared)."""
        if self.share is not None:
            return self.share.exposition()
        return generate_latest(self.registry)


class _RequestCollector:
    """Prometheus view of the per-request counters."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        latency = HistogramMetricFamily("freshet_http_request_duration_seconds", "HTTP request latency by endpoint",
                                        labels=["endpoint"])
        for endpoint, h in list(m.latency.items()):
            latency.add_metric([endpoint], h.buckets(), h.sum)
        yield latency
        requests = CounterMetricFamily("freshet_http_requests", "HTTP requests by endpoint and status",
                                       labels=["endpoint", "status"])
        for (endpoint, status), n in list(m.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        age = HistogramMetricFamily("freshet_feature_age_seconds", "Age of the feature rows served, by view",
                                    labels=["view"])
        for view, h in list(m.feature_age.items()):
            age.add_metric([view], h.buckets(), h.sum)
        yield age
        rows = CounterMetricFamily("freshet_feature_rows", "Entity rows read per view: present, stale (older "
                                   "than the view's TTL) or not_found", labels=["view", "status"])
        for (view, status), n in list(m.feature_rows.items()):
            rows.add_metric([view, status], n)
        yield rows


class _PredictionCollector:
    """Prometheus view of the predictions answered and of the prediction log."""

    def __init__(self, predictor: Any):
        self.predictor = predictor

    def describe(self):
        return []

    def collect(self):
        preds = CounterMetricFamily("freshet_predictions", "Predictions answered", labels=["model", "version"])
        for (model, version), n in list(self.predictor.counts.items()):
            preds.add_metric([model, version], n)
        yield preds
        shadow = CounterMetricFamily("freshet_shadow_predictions", "Predictions scored by the shadow version "
                                     "(logged, never returned)", labels=["model", "version"])
        for (model, version), n in list(self.predictor.shadow_counts.items()):
            shadow.add_metric([model, version], n)
        yield shadow
        plog = self.predictor.prediction_log
        if plog is not None:
            plog.hand_over()
        published = CounterMetricFamily("freshet_predictions_logged", "Predictions handed to the Kafka producer")
        dropped = CounterMetricFamily("freshet_predictions_dropped", "Predictions not logged, by reason",
                                      labels=["reason"])
        pending = GaugeMetricFamily("freshet_prediction_log_pending", "Predictions queued for Kafka")
        if plog is not None:
            published.add_metric([], plog.published)
            for reason, n in plog.dropped.items():
                dropped.add_metric([reason], n)
            pending.add_metric([], plog.pending)
        yield published
        yield dropped
        yield pending
