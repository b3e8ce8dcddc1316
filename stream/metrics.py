"""Prometheus metrics of one stream worker: events in and out, lag per partition, freshness.

Owns what a worker exports at FRESHET_STREAM_METRICS_PORT; the engine's own counters are
read when scraped, so the batch path pays only for the freshness histogram.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

from freshet.exporter import LockFreeHistogram, MetricsEndpoint

# seconds from an event's own time to its features in Redis: sub-second live, hours on a replay
FRESHNESS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class StreamMetrics(MetricsEndpoint):
    """A worker's registry: `attach` the engine, `observe_written` after each online write,
    `update_lag` now and then from the event loop."""

    def __init__(self):
        from prometheus_client import Gauge

        super().__init__()
        self.freshness: dict[str, LockFreeHistogram] = {}
        self.lag = Gauge("freshet_stream_lag", "Records behind the partition's end, per source partition this "
                         "worker owns", ["topic", "partition"], registry=self.registry)
        self.owned = Gauge("freshet_stream_partitions_owned", "Source partitions this worker owns",
                           registry=self.registry)
        self._lag_shown: set[tuple[str, str]] = set()

    def attach(self, engine: Any) -> None:
        """Expose the engine's counters (read when scraped)."""
        self.registry.register(_EngineCollector(engine, self))

    def observe_written(self, view: str, event_times: Iterable[float]) -> None:
        """A view's rows for these events are in Redis now."""
        hist = self.freshness.get(view)
        if hist is None:
            hist = self.freshness[view] = LockFreeHistogram(FRESHNESS_BUCKETS)
        now = time.time()
        for ts in event_times:
            hist.observe(now - ts)

    def update_lag(self, behind: dict[tuple[str, int], int]) -> None:
        """Records behind each owned source partition's end; partitions no longer owned disappear."""
        shown = set()
        for (topic, partition), n in behind.items():
            key = (topic, str(partition))
            self.lag.labels(*key).set(n)
            shown.add(key)
        for key in self._lag_shown - shown:
            self.lag.remove(*key)
        self._lag_shown = shown
        self.owned.set(len(behind))


class _EngineCollector:
    """Prometheus view of a StreamEngine's counters and of the freshness histograms."""

    def __init__(self, engine: Any, metrics: StreamMetrics):
        self.engine = engine
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        c = self.engine.counters
        events = CounterMetricFamily("freshet_stream_events", "Source events by outcome: accepted, "
                                     "deadlettered, duplicate (a replay skipped), rerouted", labels=["outcome"])
        for outcome, n in (("accepted", c.accepted), ("deadlettered", c.deadlettered),
                           ("duplicate", c.duplicates_skipped), ("rerouted", c.rerouted)):
            events.add_metric([outcome], n)
        yield events
        reasons = CounterMetricFamily("freshet_stream_deadletters", "Events sent to the dead-letter topic, by "
                                      "reason", labels=["reason"])
        for reason, n in list(c.reasons.items()):
            reasons.add_metric([reason], n)
        yield reasons
        rows = CounterMetricFamily("freshet_stream_rows", "Feature rows written, by store (expired: online rows "
                                   "rewritten as a tile left a window)", labels=["store"])
        for store, n in (("online", c.rows_online), ("offline", c.rows_offline), ("expired", c.rows_expired)):
            rows.add_metric([store], n)
        yield rows
        yield CounterMetricFamily("freshet_stream_batches", "Micro-batches processed", value=c.batches)
        snapshots = CounterMetricFamily("freshet_stream_table_snapshots", "Table partition snapshots: written, "
                                        "failed (not written), restored (a recovery started from one)",
                                        labels=["outcome"])
        for outcome, n in (("written", c.snapshots_written), ("failed", c.snapshot_failures),
                           ("restored", c.snapshots_restored)):
            snapshots.add_metric([outcome], n)
        yield snapshots
        fresh = HistogramMetricFamily("freshet_stream_freshness_seconds", "From an event's time to its view's "
                                      "features in Redis", labels=["view"])
        for view, h in list(self.metrics.freshness.items()):
            fresh.add_metric([view], h.buckets(), h.sum)
        yield fresh
