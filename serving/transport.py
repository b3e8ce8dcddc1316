"""How uvicorn runs the serving app: its options, and an HTTP protocol that sends each answer at once.

Owns the uvicorn configuration shared by one process and each worker, and the coalescing transport.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from freshet.settings import Settings


class CoalescingTransport:
    """A transport whose writes of one event-loop turn leave in one send.

    uvicorn writes a response's head and body separately and uvloop sends each at once:
    two syscalls and two TCP segments (the client woken twice) for every answer.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's
        return getattr(self._transport, name)


def http_protocol():
    """uvicorn's httptools protocol, writing each response with one send (see CoalescingTransport)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class ServingHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(CoalescingTransport(transport))

    return ServingHttpProtocol


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn runs the app, in one process or in each of several workers; HTTPS when a certificate is set."""
    options = dict(host=settings.http_host, port=settings.http_port, loop="uvloop", http=http_protocol(),
                   lifespan="on", access_log=False, log_level=settings.log_level.lower(), server_header=False,
                   limit_concurrency=10_000, backlog=4096, timeout_keep_alive=30)
    if settings.http_tls_certfile:
        options.update(ssl_certfile=str(Path(settings.http_tls_certfile).expanduser()),
                       ssl_keyfile=str(Path(settings.http_tls_keyfile).expanduser()))
    return options


def scheme(settings: Settings) -> str:
    """'https' when the API serves TLS (FRESHET_HTTP_TLS_CERTFILE), else 'http'."""
    return "https" if settings.http_tls_certfile else "http"
