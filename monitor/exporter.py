"""A monitor process's own Prometheus registry, served over HTTP.

The drift monitor's metrics and the consistency check's share it: one registry per
process, its endpoint started on demand and shut down with the process.
"""

from __future__ import annotations


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
