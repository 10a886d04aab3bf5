"""The aiohttp application: routes, and one cleanup context per resource, in this order:
store -> HTTP client session -> channel adapters and flow -> outbox -> session manager (restore,
re-arm, re-queue; then ``/healthz`` says ready). Shutdown unwinds in reverse.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from channels.base import ChannelAdapter, HostedChannel, SessionListener
from channels.registry import create_adapter, entry_path, holding_channels
from gateway import admin, admin_delivery, admin_settings, log_escape
from gateway.close_scripts import CloseScripts
from gateway.errors import ConfigError
from gateway.flows import Flow, create_flow
from gateway.health import StoreHealth
from gateway.http_errors import answer_errors
from gateway.inbox import EndpointInbox
from gateway.keys import ADAPTERS, CLOCK, MANAGER, METRICS, OUTBOX, SETTINGS, STORE
from gateway.metrics import Metrics
from gateway.models import Session
from gateway.outbox import Outbox, RetryPolicy
from gateway.ratelimit import RateLimiter
from gateway.runtime_settings import load_policies
from gateway.serving import raise_open_files_limit, read_in_time, run
from gateway.sessions import SessionManager
from gateway.settings import Settings, StorageBackend
from gateway.store.base import Store
from gateway.webhooks import DEDUP_RETENTION_S, webhook_handler

log = logging.getLogger("gateway.app")

RETENTION_S = DEDUP_RETENTION_S  # dedup ids and kept web chat frames (DESIGN.md)
PRUNE_EVERY_S = 3600.0


def create_store(settings: Settings) -> Store:
    """The store the configuration names."""
    if settings.storage.backend is StorageBackend.REDIS:
        # The Store interface is ready for it (DESIGN.md); the backend itself is not built yet.
        raise ConfigError([f"{settings.source}: storage.backend: redis is not available in this version; use sqlite"])
    from gateway.store.sqlite import SqliteStore

    return SqliteStore(settings.storage.path)


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
    app[STORE] = store or create_store(settings)
    app[ADAPTERS] = {endpoint.name: create_adapter(endpoint, clock) for endpoint in settings.endpoints}
    chosen_flow = flow or create_flow(settings.flow)
    scripts = CloseScripts(e.session.on_close.script for e in settings.endpoints if e.session.on_close.script)

    app.cleanup_ctx.append(_store_context)
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
    return app


async def _store_context(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.open()
    yield
    await store.aclose()


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
    outbox = Outbox(
        app[STORE],
        adapters,
        metrics=app[METRICS],
        clock=app[CLOCK],
        retry=RetryPolicy.from_settings(settings.delivery),
        limiter=RateLimiter.for_endpoints(settings.endpoints),
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
            scripts=scripts,
        )
        manager.listeners.append(_session_frames(app[ADAPTERS]))
        app[MANAGER] = manager
        await manager.start()
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


async def _retention_context(app: web.Application) -> AsyncIterator[None]:
    held = holding_channels()

    async def prune_forever() -> None:
        while True:
            try:
                removed = await app[STORE].prune(app[CLOCK]() - RETENTION_S, holding_channels=held)
                if removed:
                    log.info("pruned %d rows older than 7 days", removed)
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
    """``GET /healthz``: 200 once ready and while the store can write; else 503 and why."""

    async def healthz(request: web.Request) -> web.StreamResponse:
        manager = request.app.get(MANAGER)
        if manager is None or not manager.ready:
            return web.json_response({"status": "starting"}, status=503)
        problem = await store_health.problem()
        if problem is not None:
            return web.json_response({"status": "store cannot write", "reason": problem}, status=503)
        return web.json_response({"status": "ok", "open_sessions": manager.open_count})

    return healthz


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def serve(settings: Settings) -> int:
    """Run the gateway until SIGINT/SIGTERM; returns the process exit code."""
    raise_open_files_limit(settings.server.max_connections)
    app = create_app(settings)
    host, port = settings.server.host, settings.server.port
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    async def announce(app: web.Application) -> None:
        for endpoint in settings.endpoints:
            if isinstance(app[ADAPTERS][endpoint.name], HostedChannel):
                url = f"http://{shown_host}:{port}{entry_path(endpoint)}"
                log.info("%s %s: open %s", endpoint.channel, endpoint.name, url)
            else:
                log.info("webhook %s (%s): POST %s", endpoint.name, endpoint.channel, endpoint.path)
        log.info("serving on http://%s:%d (config %s)", host, port, settings.source)
        # Restored sessions live until they close: keep them out of the collector's full passes
        # (measured: one 12-55 ms stall per run of bench/delivery.py without this).
        gc.collect()
        gc.freeze()

    app.on_startup.append(announce)
    run(app, settings.server)  # web.run_app, with the connection limits of gateway.serving
    return 0
