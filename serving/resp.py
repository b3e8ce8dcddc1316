"""Redis connections of the fast reader: RESP over a plain socket (blocking) or an asyncio transport, parsed by hiredis.

Owns the bytes on the wire and the connection's life (connect, AUTH/SELECT, reconnect,
the watchdog that fails requests Redis does not answer); what is read is online.py's.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

class RedisUnavailable(RuntimeError):
    """Redis did not answer; the message says where and why. Reads recover when it returns."""


# ---------------------------------------------------------------------------
# Redis connections: RESP over a plain socket, parsed by hiredis
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RedisEndpoint:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> "RedisEndpoint":
        u = urlparse(url)
        query = parse_qs(u.query)
        db = (u.path or "/").lstrip("/") or query.get("db", ["0"])[0]
        return cls(
            host=u.hostname or "127.0.0.1", port=u.port or 6379,
            db=int(db or 0), username=unquote(u.username or ""), password=unquote(u.password or ""),
            tls=u.scheme == "rediss",
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    def handshake(self) -> tuple[bytes, int]:
        """The commands sent on connect (AUTH, SELECT) and how many replies they give."""
        cmds = []
        if self.password:
            auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
            cmds.append(hiredis.pack_command(auth))
        if self.db:
            cmds.append(hiredis.pack_command(("SELECT", str(self.db))))
        return b"".join(cmds), len(cmds)


def _check_replies(replies: list, endpoint: RedisEndpoint) -> list:
    for r in replies:
        if isinstance(r, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis at {endpoint} replied with an error: {r}")
    return replies


class RespConnection:
    """A blocking connection for in-process readers; one per thread, reconnects on next use.

    A reply is first polled for, for up to `poll_s`, before the thread sleeps on the socket:
    on this machine waking a sleeping thread costs more than Redis takes to answer (a PING
    round trip on loopback: 43-52 us waiting in recv, 23-26 us polling; bench/serving.py). Polling
    spends that CPU while the reply is on its way; 0 turns it off.
    """

    def __init__(self, endpoint: RedisEndpoint, timeout: float = 1.0, poll_s: float = 0.0):
        self.endpoint = endpoint
        self.timeout = timeout
        self.poll_s = 0.0 if endpoint.tls else poll_s  # TLS records need the ssl layer's reads
        self._local = threading.local()

    def _connect(self) -> tuple[socket.socket, Any]:
        ep = self.endpoint
        try:
            sock = socket.create_connection((ep.host, ep.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ep.tls:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=ep.host)
        except OSError as exc:
            raise RedisUnavailable(f"Redis at {ep} is unreachable: {exc.strerror or exc}") from None
        conn = (sock, hiredis.Reader())
        blob, n = ep.handshake()
        if n:
            _check_replies(self._roundtrip(conn, blob, n), ep)
        return conn

    def _roundtrip(self, conn, blob: bytes, n: int) -> list:
        conn[0].sendall(blob)
        return self._replies(conn, n)

    def _replies(self, conn, n: int) -> list:
        sock, reader = conn
        out: list = []
        while len(out) < n:
            reply = reader.gets()
            if reply is False:
                data = self._recv(sock)
                if not data:
                    raise ConnectionResetError("connection closed by Redis")
                reader.feed(data)
            else:
                out.append(reply)
        return out

    def _recv(self, sock: socket.socket) -> bytes:
        if self.poll_s:
            # the socket has a timeout, so its descriptor is non-blocking: os.read returns
            # at once, where sock.recv would first wait in poll()
            fd, clock = sock.fileno(), time.perf_counter
            until = clock() + self.poll_s
            while True:
                try:
                    return os.read(fd, 1 << 16)
                except BlockingIOError:
                    if clock() >= until:
                        break
        return sock.recv(1 << 16)

    def execute(self, blob: bytes, n: int) -> list:
        """Send `n` packed commands, return their `n` replies (error replies as hiredis.ReplyError)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            return self._roundtrip(conn, blob, n)
        except (OSError, hiredis.ProtocolError) as exc:
            self._failed(exc)

    def send(self, blob: bytes) -> None:
        """The first half of `execute`: send, and read the replies later with `receive` (so a
        request to several servers has all of them working at once)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            conn[0].sendall(blob)
        except OSError as exc:
            self._failed(exc)

    def receive(self, n: int) -> list:
        """The `n` replies to what `send` sent."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            raise RedisUnavailable(f"Redis at {self.endpoint}: the connection closed before its replies")
        try:
            return self._replies(conn, n)
        except (OSError, hiredis.ProtocolError) as exc:
            self._failed(exc)

    def _failed(self, exc: BaseException):
        self.close()
        reason = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or exc)
        raise RedisUnavailable(f"Redis at {self.endpoint} failed: {reason}") from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn:
            try:
                conn[0].close()
            except OSError:
                pass


class _Waiter:
    __slots__ = ("future", "n", "replies", "started")

    def __init__(self, future: asyncio.Future, n: int):
        self.future = future
        self.n = n
        self.replies: list = []
        self.started = time.monotonic()


class _RespProtocol(asyncio.Protocol):
    """Pipelined RESP: requests are written as they come; replies resolve them in order."""

    def __init__(self, endpoint: RedisEndpoint):
        self.endpoint = endpoint
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        # kept: asyncio.get_running_loop() costs a getpid() syscall per call on CPython 3.11
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while waiters:
            reply = self.reader.gets()
            if reply is False:
                return
            w = waiters[0]
            w.replies.append(reply)
            if len(w.replies) == w.n:
                waiters.popleft()
                if not w.future.done():
                    w.future.set_result(w.replies)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.fail(RedisUnavailable(f"Redis at {self.endpoint} closed the connection"
                                   + (f": {exc}" if exc else "")))

    def fail(self, error: Exception) -> None:
        while self.waiters:
            w = self.waiters.popleft()
            if not w.future.done():
                w.future.set_exception(error)

    def send(self, blob: bytes, n: int) -> asyncio.Future:
        loop = self.loop
        fut = loop.create_future()
        self.waiters.append(_Waiter(fut, n))
        # Requests of one event-loop turn leave in one write: a syscall per request costs more
        # than the request's own work when many are in flight.
        self.out.append(blob)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self.flush_scheduled = False
        out, self.out = self.out, []
        if out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class AsyncRespClient:
    """Non-blocking Redis for the server's event loop: one multiplexed connection, reconnects.

    A request waiting longer than `timeout` aborts the connection and fails every request
    on it with RedisUnavailable; the next request reconnects.
    """

    def __init__(self, endpoint: RedisEndpoint, timeout: float = 1.0, retry_after: float = 0.2):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry_after = retry_after
        self._proto: _RespProtocol | None = None
        self._connecting: asyncio.Future | None = None
        self._failed_at = 0.0
        self._last_error = ""
        self._watchdog: asyncio.Task | None = None

    async def _connect(self) -> _RespProtocol:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            ctx = ssl.create_default_context() if ep.tls else None
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _RespProtocol(ep), ep.host, ep.port, ssl=ctx,
                server_hostname=ep.host if ctx else None), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = "connect timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc))
            raise RedisUnavailable(f"Redis at {ep} is unreachable: {reason}") from None
        blob, n = ep.handshake()
        if n:
            try:
                _check_replies(await asyncio.wait_for(proto.send(blob, n), self.timeout), ep)
            except BaseException:
                proto.transport.abort()
                raise
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = loop.create_task(self._watch())
        return proto

    async def _connection(self) -> _RespProtocol:
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connecting is None:
            if time.monotonic() - self._failed_at < self.retry_after:
                raise RedisUnavailable(self._last_error)
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future) -> None:
        self._connecting = None
        if fut.cancelled():
            return
        if fut.exception() is not None:
            self._failed_at = time.monotonic()
            self._last_error = str(fut.exception())
        else:
            self._proto = fut.result()

    async def execute(self, blob: bytes, n: int) -> list:
        proto = self._proto
        if proto is None or proto.closed:
            proto = await self._connection()
        return await proto.send(blob, n)

    def submit(self, blob: bytes, n: int) -> Any:
        """`execute` without a coroutine when connected: the reply's future, the request already
        queued (a request to several servers then needs no task per server); else `execute`'s
        coroutine, which connects first."""
        proto = self._proto
        if proto is None or proto.closed:
            return self.execute(blob, n)
        return proto.send(blob, n)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self.timeout / 4))
            proto = self._proto
            if proto is None or proto.closed or not proto.waiters:
                continue
            if time.monotonic() - proto.waiters[0].started > self.timeout:
                proto.fail(RedisUnavailable(f"Redis at {self.endpoint} did not answer within "
                                            f"{self.timeout:g}s"))
                proto.transport.abort()

    async def ping(self) -> None:
        replies = await asyncio.wait_for(self.execute(b"*1\r\n$4\r\nPING\r\n", 1), self.timeout)
        _check_replies(replies, self.endpoint)

    async def close(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
        if self._proto and self._proto.transport:
            self._proto.transport.close()
        self._proto = None
