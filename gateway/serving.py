"""Serving the app on its socket, with the limits aiohttp does not have (DESIGN.md "Hostile
input"): at most ``server.max_connections`` open at once (past it a new connection is closed at
once), a request's headers and then its body must arrive within
``server.read_timeout_seconds``, the open-files limit raised to its hard limit at start, and
accept failures logged at most once a second.

``ConnectionGuard`` wraps aiohttp's protocol factory: each connection gets a
``GuardedProtocol`` in front of aiohttp's own, which counts it and cuts it when a request head
takes too long. ``read_in_time`` (a middleware, so it applies under any runner) tells the guard
where requests begin and end, and reads each body under the same timeout.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware

from gateway.log_rate import RateLimitedLog
from gateway.settings import ServerSettings

log = logging.getLogger("gateway.serving")
_limited = RateLimitedLog(log)

KEEPALIVE_TIMEOUT_S = 75.0  # an idle keep-alive connection (aiohttp's own timer)
SHUTDOWN_TIMEOUT_S = 10.0
RESERVED_FILES = 128  # descriptors besides client connections: database, platform and flow calls, logs


# -- connections -------------------------------------------------------------------------------


class _Stage(Enum):
    HEAD = "head"  # waiting for a request's head (timer armed once its first byte arrived)
    BODY = "body"  # the app has the head and reads the body (under read_in_time's timeout)
    HANDLING = "handling"  # the handler runs; bytes arriving now begin the next request
    IDLE = "idle"  # between requests of a keep-alive connection


class ConnectionGuard:
    """A protocol factory for ``loop.create_server`` that wraps ``factory`` (aiohttp's server)."""

    def __init__(self, factory: Callable[[], Any], *, max_connections: int, read_timeout_s: float) -> None:
        self._factory = factory
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.open = 0  # connections open now
        self.refused = 0  # connections closed at once: too many open
        self.timed_out = 0  # connections cut: a request head did not arrive in time

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self, self._factory)


class GuardedProtocol(asyncio.Protocol):
    """One connection: counted, its request heads timed, everything else passed to aiohttp."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], Any]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: Any = None  # aiohttp's RequestHandler, once admitted
        self._transport: asyncio.Transport | None = None
        self._stage = _Stage.HEAD
        self._next_begun = False  # bytes of the next request came while one was handled
        self._timer: asyncio.TimerHandle | None = None
        # Kept per connection, not looked up per request: on Python 3.11 every
        # get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused += 1
            _limited.warning(
                "refused", "connection closed at once: %d open (server.max_connections)", guard.max_connections
            )
            transport.abort()
            return
        guard.open += 1
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self._arm()  # a connection that sends nothing is cut like a slow head

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._stage is _Stage.IDLE:
            self._stage = _Stage.HEAD
            self._arm()
        elif self._stage is _Stage.HANDLING:
            self._next_begun = True
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._inner is not None:
            self._guard.open -= 1
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # -- told by read_in_time --------------------------------------------------------------

    def head_received(self) -> None:
        self._stage = _Stage.BODY
        self._disarm()

    def body_received(self) -> None:
        self._stage = _Stage.HANDLING

    def request_done(self) -> None:
        self._stage = _Stage.IDLE
        if self._next_begun:  # the next head began meanwhile: its time runs from now
            self._next_begun = False
            self._stage = _Stage.HEAD
            self._arm()

    # -- the head timer --------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._timer = self._loop.call_later(self._guard.read_timeout_s, self._cut)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _cut(self) -> None:
        self._timer = None
        if self._stage is not _Stage.HEAD or self._transport is None:
            return
        self._guard.timed_out += 1
        _limited.warning("slow head", "connection cut: no request head within %.1f s", self._guard.read_timeout_s)
        self._transport.abort()


class ServerLog:
    """The logger given to aiohttp's request handlers. Every malformed request (too many or too
    long headers, a broken request line) was logged with its traceback: one flood of bad
    requests filled the disk. Errors are logged at most once a second per kind, with a count;
    a client's bad HTTP without its traceback."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._limited = RateLimitedLog(logger)

    def debug(self, msg: str, *args: object, **kwargs: Any) -> None:
        self._logger.debug(msg, *args, **kwargs)

    def exception(self, msg: str, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, HttpProcessingError):
            reason = str(exc.message).splitlines()[0][:100] if exc.message else ""
            self._limited.warning(
                f"bad http {type(exc).__name__}", "bad HTTP request (%s: %s)", type(exc).__name__, reason
            )
            return
        kind = f"error {type(exc).__name__ if exc is not None else msg}"
        self._limited.log(logging.ERROR, kind, msg, *args, exc_info=exc_info)


def read_in_time(read_timeout_s: float) -> Middleware:
    """Tell the connection's guard (if any) where the request begins and ends, and read the
    body within ``read_timeout_s``: a body that trickles in slower is cut, connection and all."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        guarded = transport.get_protocol() if transport is not None else None
        if not isinstance(guarded, GuardedProtocol):
            guarded = None
        if guarded is not None:
            guarded.head_received()
        try:
            # A body that came whole with its head (most webhooks) needs no timer.
            if request.body_exists and not request.content.is_eof():
                try:
                    async with asyncio.timeout(read_timeout_s):
                        await request.read()  # kept by aiohttp: handlers read it again for free
                except TimeoutError:
                    _limited.warning("slow body", "connection cut: no request body within %.1f s", read_timeout_s)
                    if transport is not None:
                        transport.abort()
                    raise web.HTTPRequestTimeout() from None
            if guarded is not None:
                guarded.body_received()
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.request_done()

    return middleware


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ``ConnectionGuard``."""

    def __init__(
        self, runner: web.BaseRunner, server: ServerSettings, *, sock: socket.socket | None = None, backlog: int = 128
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._settings = server
        self._sock = sock  # bound already (a port in use was found before anything started)
        self.guard: ConnectionGuard | None = None

    @property
    def name(self) -> str:
        return f"http://{self._settings.host}:{self._settings.port}"

    @property
    def port(self) -> int:
        """The bound port (``server.port: 0`` picks a free one)."""
        sockets = getattr(self._server, "sockets", None) or ()  # an asyncio.Server once started
        return int(sockets[0].getsockname()[1]) if sockets else self._settings.port

    async def start(self) -> None:
        await super().start()
        assert self._runner.server is not None
        self.guard = ConnectionGuard(
            self._runner.server,
            max_connections=self._settings.max_connections,
            read_timeout_s=self._settings.read_timeout_seconds,
        )
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._server = await loop.create_server(self.guard, sock=self._sock, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                self.guard, self._settings.host, self._settings.port, backlog=self._backlog, reuse_address=True
            )


@dataclass(slots=True)
class Serving:
    runner: web.AppRunner
    site: GuardedSite


def make_runner(app: web.Application, *, handle_signals: bool = False) -> web.AppRunner:
    """The runner of ``app``: aiohttp's error logs rate-limited, our keep-alive and shutdown."""
    return web.AppRunner(
        app,
        handle_signals=handle_signals,
        access_log=None,
        logger=ServerLog(logging.getLogger("aiohttp.server")),
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


async def start_serving(app: web.Application, server: ServerSettings, *, handle_signals: bool = False) -> Serving:
    """Start ``app`` (cleanup contexts run now) on ``server.host:port`` behind the guard."""
    runner = make_runner(app, handle_signals=handle_signals)
    await runner.setup()
    site = GuardedSite(runner, server)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, site)


# -- the process ---------------------------------------------------------------------------------


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force. Warns when
    it leaves too little room for ``max_connections`` (accept would then fail first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and max_connections + RESERVED_FILES > soft:
        log.warning(
            "server.max_connections %d leaves too little room under the open-files limit %d; "
            "connections past about %d will fail to be accepted",
            max_connections,
            soft,
            max(soft - RESERVED_FILES, 0),
        )
    return soft


# SQLite's writer and reader threads hand the GIL back and forth with the event loop: sqlite3
# releases it around each statement, and to take it back a thread waits for the loop to let go,
# which a busy loop does only every switch interval (5 ms by default). Measured (a 1M-session
# file, batches of 1000 closes on a thread beside a busy main thread): 19.4 ms a batch at 5 ms,
# 9.8 ms at 1 ms, 7.4 ms at 0.5 ms, against 6.2 ms with the main thread idle.
GIL_SWITCH_INTERVAL_S = 0.0005


def share_the_gil_sooner() -> None:
    """Set the interpreter's switch interval to ``GIL_SWITCH_INTERVAL_S`` (process-wide; done by
    ``chat-gateway serve`` before the loop starts, and by the benchmarks that stand in for it)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def log_loop_exceptions(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own errors; accept failures (out of file descriptors) repeat by the thousand
    per second, so they are logged at most once a second with a count."""
    message = str(context.get("message", ""))
    if message.startswith("socket.accept() out of system resource"):
        _limited.log(logging.ERROR, "accept", "%s: %s", message, context.get("exception"))
        return
    loop.default_exception_handler(context)
