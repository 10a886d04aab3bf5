"""The aiohttp application: routes, and one cleanup context per resource, in this order:
store -> ownership (several instances: this instance's heartbeat) -> HTTP client session ->
channel adapters and flow -> outbox -> session manager (restore, re-arm, re-queue; then
``/healthz`` says ready) -> retention. Shutdown unwinds in reverse: with several instances the
others take this one's conversations over once its outbox has stopped.

``serve`` runs it: the port is bound first (not listening yet), so a port in use fails at once,
in one logged line and exit code 1, before the database is touched; so does a database locked
by another process, or a Redis that does not answer. SIGTERM and SIGINT are logged, then the
gateway stops cleanly (exit 0).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from channels.base import ChannelAdapter, HostedChannel, SessionListener
from channels.registry import create_adapter, entry_path, holding_channels, is_hosted
from gateway import admin, admin_delivery, admin_openapi, admin_settings, admin_ui, log_escape
from gateway.close_scripts import CloseScripts
from gateway.collector import CollectorPacer
from gateway.errors import ConfigError, StoreError
from gateway.flows import Flow, create_flow
from gateway.health import StoreHealth
from gateway.http_errors import answer_errors
from gateway.inbox import EndpointInbox
from gateway.keys import ADAPTERS, CLOCK, MANAGER, METRICS, OUTBOX, OWNERSHIP, SETTINGS, STORE
from gateway.logs import log_context
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.models import Session
from gateway.outbox import Outbox
from gateway.outbox_outcomes import RetryPolicy
from gateway.ratelimit import RateLimiter
from gateway.runtime_settings import apply_stored_settings, load_policies
from gateway.serving import (
    GuardedSite,
    log_loop_exceptions,
    make_runner,
    raise_open_files_limit,
    read_in_time,
    share_the_gil_sooner,
)
from gateway.sessions import SessionManager
from gateway.sessions.ownership import Ownership, SoleOwner
from gateway.settings import Settings, StorageBackend
from gateway.store.base import Store
from gateway.webhooks import webhook_handler

log = logging.getLogger("gateway.app")

DAY_S = 24 * 3600.0
PRUNE_EVERY_S = 3600.0
SHUTDOWN_TIMEOUT_S = 10.0


def create_store(settings: Settings, clock: Callable[[], float] = time.time) -> Store:
    """The store the configuration names."""
    storage = settings.storage
    if storage.backend is StorageBackend.REDIS:
        from gateway.store.redis import RedisStore

        if storage.url is None:  # the config checks refuse this already
            raise ConfigError([f"{settings.source}: storage.url: required when backend is redis"])
        retention_s = max(1, int(settings.retention.dedup_days * DAY_S))  # dedup ids expire by TTL
        return RedisStore(storage.url, storage.key_prefix, retention_s=retention_s, clock=clock)
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(settings.storage.path)


def create_ownership(settings: Settings, store: Store) -> Ownership:
    """One process owns everything (SQLite); several instances share Redis (leases)."""
    if settings.storage.backend is StorageBackend.REDIS:
        from gateway.store.redis import RedisStore
        from gateway.store.redis_ownership import RedisOwnership

        if isinstance(store, RedisStore):
            return RedisOwnership(store)
    return SoleOwner()


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    store: Store | None = None,
    flow: Flow | None = None,
) -> web.Application:
    """Build the gateway application. ``store`` and ``flow`` may be passed in (tests)."""
    log_escape.install()  # user text in log lines is escaped from here on (process-wide)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[answer_errors, read_in_time(settings.server.read_timeout_seconds), admin.admin_auth],
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[METRICS] = Metrics()
    app[STORE] = store or create_store(settings, clock)
    app[OWNERSHIP] = create_ownership(settings, app[STORE])
    app[ADAPTERS] = {endpoint.name: create_adapter(endpoint, clock) for endpoint in settings.endpoints}
    for name, adapter in app[ADAPTERS].items():
        app[METRICS].declare_endpoint(name, webhook=not isinstance(adapter, HostedChannel))
    chosen_flow = flow or create_flow(settings.flow)
    scripts = CloseScripts(e.session.on_close.script for e in settings.endpoints if e.session.on_close.script)

    app.cleanup_ctx.append(_store_context)
    app.cleanup_ctx.append(_ownership_context)
    app.cleanup_ctx.append(_http_context(chosen_flow, scripts))
    app.cleanup_ctx.append(_outbox_context)
    app.cleanup_ctx.append(_manager_context(chosen_flow, scripts))
    app.cleanup_ctx.append(_retention_context)
    app.on_shutdown.append(_close_sockets)

    app.router.add_get("/healthz", healthz_handler(StoreHealth(app[STORE])))
    app.router.add_get("/metrics", metrics)
    for endpoint in settings.endpoints:
        adapter = app[ADAPTERS][endpoint.name]
        if isinstance(adapter, HostedChannel):
            adapter.add_routes(app.router, entry_path(endpoint), EndpointInbox(app, endpoint.name))
        else:
            handler = webhook_handler(endpoint)
            app.router.add_post(endpoint.path, handler)
            app.router.add_get(endpoint.path, handler)
    admin.add_routes(app)
    admin_settings.add_routes(app)
    admin_delivery.add_routes(app)
    admin_ui.add_routes(app)
    admin_openapi.add_routes(app)
    return app


async def _store_context(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.open()
    yield
    await store.aclose()


async def _ownership_context(app: web.Application) -> AsyncIterator[None]:
    ownership = app[OWNERSHIP]
    await ownership.start()
    try:
        yield
    finally:
        await ownership.aclose()


def _http_context(flow: Flow, scripts: CloseScripts) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        # trust_env stays off: platform and flow calls go exactly where configured.
        async with aiohttp.ClientSession() as http:
            started: list[ChannelAdapter] = []
            try:
                for adapter in app[ADAPTERS].values():
                    await adapter.start(http)
                    started.append(adapter)
                await flow.start(http)
                await scripts.start(http)
                yield
            finally:
                await scripts.aclose()
                await flow.aclose()
                for adapter in reversed(started):
                    await adapter.aclose()

    return context


async def _outbox_context(app: web.Application) -> AsyncIterator[None]:
    adapters: dict[str, ChannelAdapter] = app[ADAPTERS]
    settings = app[SETTINGS]
    ownership = app[OWNERSHIP]
    outbox = Outbox(
        app[STORE],
        adapters,
        metrics=app[METRICS],
        clock=app[CLOCK],
        retry=RetryPolicy.from_settings(settings.delivery),
        limiter=RateLimiter.for_endpoints(settings.endpoints),
        forward=None if ownership.owns_everything else ownership.forward_message,
        resume_all=ownership.owns_everything,
        holding_channels=holding_channels(),
    )
    app[OUTBOX] = outbox
    await outbox.start()
    yield
    await outbox.aclose()


def _manager_context(flow: Flow, scripts: CloseScripts) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        policies = await load_policies(settings, app[STORE])
        manager = SessionManager(
            app[STORE],
            flow,
            app[OUTBOX],
            policies,
            metrics=app[METRICS],
            clock=app[CLOCK],
            error_reply=settings.flow.error_reply,
            max_pending_events=settings.server.max_pending_events,
            own_budgets=[e.name for e in settings.endpoints if is_hosted(e.channel)],
            scripts=scripts,
            ownership=app[OWNERSHIP],
        )
        manager.listeners.append(_session_frames(app[ADAPTERS]))
        app[MANAGER] = manager
        await manager.start()
        app[OWNERSHIP].bind(
            manager, app[OUTBOX], functools.partial(apply_stored_settings, settings, app[STORE], manager)
        )
        yield
        await manager.aclose()

    return context


def _session_frames(adapters: dict[str, ChannelAdapter]) -> Callable[[Session], None]:
    """Adapters that listen (web chat sockets) hear of every change of their conversations' sessions."""
    listeners = {name: adapter for name, adapter in adapters.items() if isinstance(adapter, SessionListener)}

    def listener(session: Session) -> None:
        adapter = listeners.get(session.endpoint)
        if adapter is not None:
            adapter.session_changed(session.conversation, session.state.value, session.id)

    return listener


async def prune_once(app: web.Application) -> int:
    """Apply ``retention``: dedup ids (and messages kept for a web chat that never came back)
    older than ``dedup_days``, closed sessions (then contacts left without any) older than
    ``closed_sessions_days``, sent and skipped messages older than ``messages_days``."""
    retention = app[SETTINGS].retention
    store, now = app[STORE], app[CLOCK]()
    removed = await store.prune(now - retention.dedup_days * DAY_S, holding_channels=holding_channels())
    removed += await store.prune_history(
        closed_sessions_before=now - retention.closed_sessions_days * DAY_S,
        messages_before=now - retention.messages_days * DAY_S,
    )
    return removed


async def _retention_context(app: web.Application) -> AsyncIterator[None]:
    async def prune_forever() -> None:
        while True:
            try:
                removed = await prune_once(app)
                if removed:
                    log.info("retention: pruned %d rows", removed)
            except Exception:
                log.exception("pruning failed; trying again later")
            await asyncio.sleep(PRUNE_EVERY_S)

    task = asyncio.create_task(prune_forever(), name="retention")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _close_sockets(app: web.Application) -> None:
    """Hosted channels end their clients' connections first (web chat sockets)."""
    for adapter in app[ADAPTERS].values():
        if isinstance(adapter, HostedChannel):
            await adapter.aclose()


def healthz_handler(store_health: StoreHealth) -> Handler:
    """``GET /healthz``: 200 once ready, while the store can write and (several instances)
    while this instance's heartbeat is fresh; else 503 and why."""

    async def healthz(request: web.Request) -> web.StreamResponse:
        manager = request.app.get(MANAGER)
        if manager is None or not manager.ready:
            return web.json_response({"status": "starting"}, status=503)
        problem = await store_health.problem() or request.app[OWNERSHIP].problem()
        if problem is not None:
            return web.json_response({"status": "store cannot write", "reason": problem}, status=503)
        return web.json_response({"status": "ok", "open_sessions": manager.open_count})

    return healthz


async def metrics(request: web.Request) -> web.StreamResponse:
    app = request.app
    try:
        app[METRICS].set_gauge("gateway_dead_letters", await app[STORE].count_dead_letters())
    except StoreError as exc:  # the scrape still answers; the gauge keeps its last value
        log.warning("cannot count dead letters for /metrics: %s", exc)
    # Rendered off the loop (tens of ms with many endpoints); the snapshot is taken on it.
    body = await asyncio.to_thread(app[METRICS].snapshot().render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def serve(settings: Settings) -> int:
    """Run the gateway until SIGINT/SIGTERM; returns the process exit code: 0 after a clean
    stop, 1 when it could not start (port in use, database locked: one logged line)."""
    raise_open_files_limit(settings.server.max_connections)
    share_the_gil_sooner()
    return asyncio.run(_serve(settings))


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` but not listening: connections are refused until the
    gateway is ready, and a port in use is found before anything else starts."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _serve(settings: Settings) -> int:
    host = settings.server.host
    try:
        sock = _bind(host, settings.server.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, settings.server.port, exc.strerror or exc)
        return 1
    port = sock.getsockname()[1]
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(log_loop_exceptions)
    runner = make_runner(app)
    try:
        await runner.setup()
    except StoreError as exc:  # e.g. StoreLocked: another process has the database
        sock.close()
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        return 1
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _stop, signum, stopping)
    collector = CollectorPacer(loop=loop)
    try:
        await GuardedSite(runner, settings.server, sock=sock).start()
        _announce(runner.app, settings, host, port)
        # Restored sessions live until they close: the collector stops walking them (and what
        # lives long from now on), see gateway/collector.py.
        collector.install()
        await stopping.wait()
    finally:
        collector.uninstall()
        await runner.cleanup()
    log.info("stopped")
    return 0


def _stop(signum: int, stopping: asyncio.Event) -> None:
    log.info("received %s: shutting down", signal.Signals(signum).name)
    stopping.set()


def _announce(app: web.Application, settings: Settings, host: str, port: int) -> None:
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    for endpoint in settings.endpoints:
        if isinstance(app[ADAPTERS][endpoint.name], HostedChannel):
            url = f"http://{shown_host}:{port}{entry_path(endpoint)}"
            log.info("%s %s: open %s", endpoint.channel, endpoint.name, url, extra=log_context(endpoint.name))
        else:
            log.info(
                "webhook %s (%s): POST %s",
                endpoint.name,
                endpoint.channel,
                endpoint.path,
                extra=log_context(endpoint.name),
            )
    if settings.admin.token:
        log.info("admin page: http://%s:%d/admin/ui", shown_host, port)
    log.info("serving on http://%s:%d (config %s)", host, port, settings.source)
