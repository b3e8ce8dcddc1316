"""Prometheus exposition shared by every freshet process: a registry served over HTTP,
a histogram cheap enough for hot paths, and one process's share of a multiprocess directory.

The monitor's, the consistency check's and the stream worker's metrics are each one
`MetricsEndpoint`; `serve --workers N` aggregates its workers through `ProcessShare`.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from pathlib import Path


class MetricsEndpoint:
    """Holds `registry`; `serve` exposes it at http://addr:port/metrics until `close`."""

    def __init__(self):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self._server = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class LockFreeHistogram:
    """A Prometheus histogram without locks: observed from the event loop thread only.

    >>> h = LockFreeHistogram((0.001, 0.01))
    >>> for seconds in (0.0005, 0.001, 0.5):
    ...     h.observe(seconds)
    >>> h.buckets()
    [('0.001', 2), ('0.01', 2), ('+Inf', 3)]
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # buckets are "<= le"
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts):
            total += n
            out.append((bound, total))
        return out


class ProcessShare:
    """One process's metrics in a prometheus_client multiprocess directory, and the sum of all.

    `publish` writes the current value of every sample of `registry` into this process's
    files there (the format `MultiProcessCollector` reads: one file per metric type and
    process id); `exposition` publishes, then answers for every process that shares the
    directory: counters and histograms summed, gauges by their mode in `gauge_modes`
    ("livesum" unless named). Values are copied when published, not on every update, so
    hot paths keep their own cheap counters. The directory is the caller's to create and
    remove (and, for a process that died, `prometheus_client.multiprocess.mark_process_dead`).
    """

    def __init__(self, directory: str | os.PathLike, registry, gauge_modes: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.registry = registry
        self.gauge_modes = gauge_modes or {}
        self.pid = os.getpid()
        self._files: dict[str, object] = {}
        self._keys: dict[tuple, str] = {}
        self._written: dict[str, float] = {}

    def _file(self, prefix: str):
        from prometheus_client.mmap_dict import MmapedDict

        f = self._files.get(prefix)
        if f is None:
            f = self._files[prefix] = MmapedDict(str(self.directory / f"{prefix}_{self.pid}.db"))
        return f

    def _write(self, prefix: str, family, name: str, labels: dict, value: float) -> None:
        ident = (family.name, name, tuple(labels.items()))
        key = self._keys.get(ident)
        if key is None:
            from prometheus_client.mmap_dict import mmap_key

            key = self._keys[ident] = mmap_key(family.name, name, list(labels), list(labels.values()),
                                               family.documentation)
        value = float(value)
        if self._written.get(key) != value:  # most series of a quiet process do not move between publishes
            self._file(prefix).write_value(key, value, 0.0)
            self._written[key] = value

    def publish(self) -> None:
        """Write this process's current values."""
        for family in self.registry.collect():
            if family.type == "counter":
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        self._write("counter", family, s.name, s.labels, s.value)
            elif family.type == "gauge":
                mode = self.gauge_modes.get(family.name, "livesum")
                for s in family.samples:
                    self._write(f"gauge_{mode}", family, s.name, s.labels, s.value)
            elif family.type == "histogram":
                self._publish_histogram(family)

    def _publish_histogram(self, family) -> None:
        # the files hold each bucket's own count; the collector accumulates them again
        below: dict[tuple, float] = {}
        for s in family.samples:
            if s.name.endswith("_bucket"):
                series = tuple((k, v) for k, v in s.labels.items() if k != "le")
                self._write("histogram", family, s.name, s.labels, s.value - below.get(series, 0.0))
                below[series] = s.value
            elif s.name.endswith("_sum"):
                self._write("histogram", family, s.name, s.labels, s.value)

    def exposition(self) -> bytes:
        """The Prometheus text of every process sharing the directory, this one's values fresh."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.publish()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
