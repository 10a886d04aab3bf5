"""A lean HTTP/1.1 client for a platform's send calls: keep-alive connections to one origin.

Why not aiohttp's ``ClientSession`` here: under load (bench/ingest.py with py-spy) one
``ClientSession.post`` with its answer read cost ~200-260 us of CPU on these machines, a third
of the gateway's event loop per echoed message; a request on this client costs ~60-65 us
(bench/http1_client.py measures both against one fake API). A send call needs little of what
the session offers: one origin, no cookies, no redirects, no proxies (the shared session has
``trust_env`` off too), a small JSON body with a fixed set of headers, a small answer.

What it does:

- one ``Http1Client`` per origin (``http://`` or ``https://``, certificates verified against
  the system's store, as aiohttp's default); at most ``max_connections`` open, the rest of the
  requests wait their turn; idle connections are reused, most recently used first, and closed
  after ``idle_timeout_s``;
- one request at a time per connection (no pipelining); the request's head is prepared once
  (``prepare``) and only ``Content-Length`` and the body change per request;
- the answer is read by ``Content-Length``, ``chunked`` transfer coding, or until the server
  closes; ``1xx`` heads are skipped; a head over ``MAX_HEAD_BYTES`` or a body over
  ``max_body_bytes`` is a ``BadAnswer``, and that connection is closed;
- a connection is kept only when the answer was read whole on HTTP/1.1 without
  ``Connection: close``; a request that failed or was cancelled (a timeout) closes its
  connection, so a late answer can never be read as the next request's.

Errors: ``ConnectionFailed`` (refused, reset, TLS failure, or the connection closed before the
whole answer: a reused connection the server had just closed shows this way, and the caller
decides about a retry, as it did with aiohttp's ``ServerDisconnectedError``), ``BadAnswer``
(not HTTP/1.x, or too large), ``TimeoutError`` (the whole request, waiting for a connection
included, took longer than its ``timeout_s``).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers
MAX_LINE_BYTES = 8 * 1024  # a chunk-size line, a trailer line
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@functools.cache
def verified_tls() -> ssl.SSLContext:
    """The one client TLS context of the process (system certificates, hostnames checked).
    Built once, when first needed: loading the system's certificates takes tens of ms."""
    return ssl.create_default_context()


class Http1Error(Exception):
    """A request got no usable answer."""


class ConnectionFailed(Http1Error):
    """The connection could not be made, broke, or closed before the whole answer."""


class BadAnswer(Http1Error):
    """The server's bytes are not an HTTP/1.x answer this client accepts."""


@dataclass(slots=True, frozen=True)
class Answer:
    """One whole answer: status, headers (case-insensitive names), body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class _Stage(Enum):
    HEAD = 1
    LENGTH = 2
    CHUNK_SIZE = 3
    CHUNK_DATA = 4
    TRAILERS = 5
    UNTIL_CLOSE = 6
    IDLE = 7


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as it arrives."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body = max_body_bytes
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._stage = _Stage.IDLE
        self._answer: asyncio.Future[Answer] | None = None
        self._status = 0
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._body = bytearray()
        self._remaining = 0
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport (TCP or TLS)

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self._close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        self._buffer += data
        try:
            self._advance()
        except BadAnswer as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the answer was

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self._answer
        if answer is None or answer.done():
            return
        if self._stage is _Stage.UNTIL_CLOSE and exc is None:
            self._finish(bytes(self._body))
            return
        reason = f": {exc}" if exc is not None else ""
        answer.set_exception(ConnectionFailed(f"the server closed the connection before a complete answer{reason}"))

    # -- requests ---------------------------------------------------------------------------------

    def send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Answer]:
        """Write one whole request; the future gets its answer."""
        assert self._transport is not None and self._stage is _Stage.IDLE
        self._answer = answer = loop.create_future()
        self._stage = _Stage.HEAD
        self._buffer.clear()
        self._transport.write(data)
        return answer

    def abort(self) -> None:
        """Drop the connection now (a request failed or was cancelled mid-way)."""
        self.reusable = False
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        self.abort()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    def _finish(self, body: bytes) -> None:
        answer = self._answer
        self._stage = _Stage.IDLE
        # Bytes beyond the answer (not a server to keep talking to), or the answer said close.
        if self._buffer or not self.reusable:
            self._close()
        if answer is not None and not answer.done():
            answer.set_result(Answer(self._status, CIMultiDictProxy(self._headers), body))

    # -- the answer -------------------------------------------------------------------------------

    def _advance(self) -> None:
        buffer = self._buffer
        while True:
            stage = self._stage
            if stage is _Stage.HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end > MAX_HEAD_BYTES or (end < 0 and len(buffer) > MAX_HEAD_BYTES):
                    raise BadAnswer(f"answer head over {MAX_HEAD_BYTES} bytes")
                if end < 0:
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._read_head(head)
            elif stage is _Stage.LENGTH:
                if len(buffer) < self._remaining:
                    return
                body = bytes(buffer[: self._remaining])
                del buffer[: self._remaining]
                self._finish(body)
                return
            elif stage is _Stage.CHUNK_SIZE:
                line = self._line(buffer)
                if line is None:
                    return
                size_text = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise BadAnswer(f"bad chunk size {size_text[:20]!r}") from None
                if size < 0 or len(self._body) + size > self._max_body:
                    raise BadAnswer(f"answer body over {self._max_body} bytes")
                self._remaining = size
                self._stage = _Stage.CHUNK_DATA if size else _Stage.TRAILERS
            elif stage is _Stage.CHUNK_DATA:
                size = self._remaining
                if len(buffer) < size + 2:
                    return
                if buffer[size : size + 2] != b"\r\n":
                    raise BadAnswer("chunk not followed by CRLF")
                self._body += buffer[:size]
                del buffer[: size + 2]
                self._stage = _Stage.CHUNK_SIZE
            elif stage is _Stage.TRAILERS:
                line = self._line(buffer)
                if line is None:
                    return
                if not line:
                    self._finish(bytes(self._body))
                    return
            elif stage is _Stage.UNTIL_CLOSE:
                self._body += buffer
                buffer.clear()
                if len(self._body) > self._max_body:
                    raise BadAnswer(f"answer body over {self._max_body} bytes")
                return
            else:  # IDLE: the answer is complete (a 204 or 304); _finish judged what came after it
                return

    @staticmethod
    def _line(buffer: bytearray) -> bytes | None:
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > MAX_LINE_BYTES:
                raise BadAnswer(f"a line over {MAX_LINE_BYTES} bytes")
            return None
        line = bytes(buffer[:end])
        del buffer[: end + 2]
        return line

    def _read_head(self, head: bytes) -> None:
        # Decoded once as a whole (latin-1 maps every byte), the headers built in one call:
        # a real platform answers with 15-20 headers.
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise BadAnswer(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
        status = int(code)
        pairs = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise BadAnswer(f"bad header line {line[:40]!r}")
            pairs.append((name, value.strip()))
        headers: CIMultiDict[str] = CIMultiDict(pairs)
        if 100 <= status < 200:
            if status == 101:
                raise BadAnswer("101 Switching Protocols to a request that asked for no upgrade")
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._status, self._headers = status, headers
        self._body = bytearray()
        connection = headers.get("Connection", "").lower()
        if version == "HTTP/1.0" or "close" in connection:
            self.reusable = False
        if status in (204, 304):
            self._finish(b"")
            return
        coding = headers.get("Transfer-Encoding")
        lengths = headers.getall("Content-Length", [])
        if coding is not None:
            if lengths:
                raise BadAnswer("both Transfer-Encoding and Content-Length")
            if coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._stage = _Stage.CHUNK_SIZE
            else:  # another final coding: the body runs until the server closes
                self._stage, self.reusable = _Stage.UNTIL_CLOSE, False
        elif lengths:
            if len(set(lengths)) != 1 or not lengths[0].isdigit():
                raise BadAnswer(f"bad Content-Length {lengths!r}")
            length = int(lengths[0])
            if length > self._max_body:
                raise BadAnswer(f"answer body over {self._max_body} bytes")
            self._stage, self._remaining = _Stage.LENGTH, length
        else:
            self._stage, self.reusable = _Stage.UNTIL_CLOSE, False


def _expired(connection: _Connection, idle_since_before: float) -> bool:
    """An idle connection not to use again: the server closed it, or it idled too long."""
    return connection.closed or connection.idle_since <= idle_since_before


def _time_out(answer: asyncio.Future[Answer]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


class Http1Client:
    """Keep-alive HTTP/1.1 connections to one origin (``base_url``'s scheme, host and port),
    for small requests with a prepared head; request paths are relative to ``base_url``'s path.
    Create and use it inside the running loop."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 100,
        idle_timeout_s: float = 15.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http:// or https:// URL")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        default_port = 443 if self._https else 80
        self._port = parts.port or default_port
        self._base_path = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.host_header = host if self._port == default_port else f"{host}:{self._port}"
        self._ssl = (ssl_context or verified_tls()) if self._https else None
        self._max_body = max_body_bytes
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        self._open = 0  # connections in use or idle
        self._idle: list[_Connection] = []
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def __repr__(self) -> str:
        scheme = "https" if self._https else "http"
        return f"Http1Client({scheme}://{self.host_header}, idle={len(self._idle)})"

    def prepare(self, method: str, path: str, headers: Mapping[str, str]) -> bytes:
        """The head of a request up to its ``Content-Length`` line, to pass to ``request``.
        ``path`` (and query) is relative to ``base_url``'s path; ``Host`` is added here."""
        if any(c in path for c in " \r\n"):
            raise ValueError(f"bad request path {path!r}")
        target = f"{self._base_path}/{path.lstrip('/')}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        for name, value in headers.items():
            if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
                raise ValueError(f"{name} is set by the client")
            if any(c in name + value for c in "\r\n"):
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def request(self, head: bytes, body: bytes, timeout_s: float) -> Answer:
        """Send ``head`` (from ``prepare``) with ``body``; the whole answer, or an ``Http1Error``
        or ``TimeoutError`` within ``timeout_s`` (waiting for a free connection included)."""
        if self._closed:
            raise ConnectionFailed("the client is closed")
        loop = self._loop
        deadline = loop.time() + timeout_s
        connection = self._take_idle()
        if connection is None:
            async with asyncio.timeout_at(deadline):  # the slow path: a new connection, or a wait
                connection = await self._new_or_freed()
        # One timer on the answer's future, not asyncio.timeout: this is every reply's path.
        answer = connection.send(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body), loop)
        timer = loop.call_at(deadline, _time_out, answer)
        try:
            result = await answer
        except BaseException:
            self._drop(connection)  # its state is unknown: never reuse it
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return result

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for connection in idle:
            self._drop(connection)
        while self._wake_one(None):  # requests waiting for a connection learn it is closed
            pass

    # -- the pool ---------------------------------------------------------------------------------

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        expired_before = self._loop.time() - self._idle_timeout_s
        while idle:
            connection = idle.pop()  # the most recently used: least likely closed by the server
            if not _expired(connection, expired_before):
                return connection
            self._drop(connection)
        return None

    async def _new_or_freed(self) -> _Connection:
        """A new connection while fewer than ``max_connections`` are open; else the first one
        a finished request frees (or the right to open one, when a request dropped its own)."""
        while self._open >= self._max_connections:
            waiter: asyncio.Future[_Connection | None] = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                freed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():  # handed over just as we gave up: pass it on
                    handed = waiter.result()
                    if handed is not None:
                        self._release(handed)
                    else:
                        self._wake_one(None)
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            if self._closed:
                if freed is not None:
                    self._drop(freed)
                raise ConnectionFailed("the client is closed")
            if freed is not None:
                return freed
            connection = self._take_idle()
            if connection is not None:
                return connection
        if self._closed:
            raise ConnectionFailed("the client is closed")
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake_one(None)
            raise

    async def _connect(self) -> _Connection:
        max_body = self._max_body
        try:
            _, connection = await self._loop.create_connection(
                lambda: _Connection(max_body),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors
            raise ConnectionFailed(f"cannot connect to {self.host_header}: {exc}") from exc
        return connection

    def _release(self, connection: _Connection) -> None:
        """A request ended with its answer read whole: keep the connection, or hand it over."""
        if connection.closed or not connection.reusable or self._closed:
            self._drop(connection)
            return
        if self._wake_one(connection):
            return
        connection.idle_since = self._loop.time()
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = self._loop.call_later(self._idle_timeout_s, self._close_expired)

    def _drop(self, connection: _Connection) -> None:
        """Close a connection for good; a waiting request may open one instead."""
        connection.abort()
        self._open -= 1
        self._wake_one(None)

    def _wake_one(self, connection: _Connection | None) -> bool:
        """Hand ``connection`` (or, with None, the right to open one) to the first waiter."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False

    def _close_expired(self) -> None:
        """Close connections idle for longer than ``idle_timeout_s``; re-arm while any is idle."""
        self._sweep = None
        expired_before = self._loop.time() - self._idle_timeout_s
        kept = []
        for connection in self._idle:
            if _expired(connection, expired_before):
                self._drop(connection)
            else:
                kept.append(connection)
        self._idle[:] = kept
        if kept:
            wait_s = kept[0].idle_since - expired_before
            self._sweep = self._loop.call_later(max(wait_s, 0.05), self._close_expired)
