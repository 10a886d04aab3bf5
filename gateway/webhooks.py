"""``/webhooks/<endpoint>``: size check, verification and parsing by the channel adapter, then
every event committed to the durable inbox before the platform gets its answer."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler

from channels.base import WebhookChannel, WebhookRequest, WebhookResponse
from gateway.errors import RequestRejected, StoreError, Unavailable
from gateway.keys import ADAPTERS, CLOCK, MANAGER, METRICS, SETTINGS
from gateway.log_rate import RateLimitedLog
from gateway.models import InboundEvent
from gateway.proxies import public_url
from gateway.settings import EndpointSettings, ServerSettings

log = logging.getLogger("gateway.webhooks")

# Dedup ids are kept this long (longer than any platform redelivers); an event older than this
# by its platform's clock is not answered (DESIGN.md "Contract details", "Hostile input").
DAY_S = 24 * 3600.0


async def to_webhook_request(request: web.Request, settings: ServerSettings) -> WebhookRequest:
    """The request as an adapter sees it. The body is not parsed here: adapters verify the
    signature over the raw bytes first (only Twilio reads a form, and it signs the fields)."""
    body = await request.read()  # raises 413 past client_max_size, before anything else
    return WebhookRequest(
        method=request.method,
        path=request.path,
        query=request.query,
        public_url=public_url(request, settings.public_url, settings.trusted_proxies),
        headers=request.headers,
        body=body,
        content_type=request.content_type,
    )


def is_stale(event: InboundEvent, arrival: float, dedup_retention_s: float) -> bool:
    """Older than the dedup retention by its platform's timestamp: its dedup id may be pruned
    already, so it could only be a replay of a captured webhook (DESIGN.md "Hostile input")."""
    return event.timestamp is not None and event.timestamp < arrival - dedup_retention_s


def _response(answer: WebhookResponse) -> web.Response:
    return web.Response(
        status=answer.status, text=answer.text, content_type=answer.content_type, headers=dict(answer.headers)
    )


def webhook_handler(endpoint: EndpointSettings) -> Handler:
    """The POST (events) and GET (handshake) handler of one platform endpoint."""

    # Rejections can come by the thousand (a flood of forged requests): one line a second.
    rejections = RateLimitedLog(log)

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        app = request.app
        # Only webhook channels get this route (create_app). Not an isinstance check: against a
        # runtime Protocol that costs ~5% of the gateway's time under load (bench/ingest.py).
        adapter = cast(WebhookChannel, app[ADAPTERS][endpoint.name])
        metrics = app[METRICS]
        try:
            incoming = await to_webhook_request(request, app[SETTINGS].server)
            if request.method == "GET":
                return _response(adapter.handshake(incoming))
            parsed = adapter.parse_webhook(incoming)
        except RequestRejected as exc:
            metrics.inc("gateway_webhook_requests_total", endpoint=endpoint.name, outcome=f"rejected_{exc.status}")
            rejections.warning(
                f"rejected {exc.status}: {exc.reason}",
                "webhook rejected: endpoint=%s status=%d reason=%s",
                endpoint.name,
                exc.status,
                exc.reason,
            )
            raise
        arrival = app[CLOCK]()
        manager = app[MANAGER]
        dedup_retention_s = app[SETTINGS].retention.dedup_days * DAY_S
        events = [event for event in parsed.events if not is_stale(event, arrival, dedup_retention_s)]
        if len(events) < len(parsed.events):
            metrics.inc(
                "gateway_events_total", len(parsed.events) - len(events), endpoint=endpoint.name, outcome="stale"
            )
        # All events of the batch are committed (group-committed together) before the 2xx.
        try:
            if len(events) == 1:  # the usual case: no task for gather to wrap it in
                await manager.accept(endpoint.name, events[0], arrival)
            else:
                await asyncio.gather(*(manager.accept(endpoint.name, event, arrival) for event in events))
        except StoreError as exc:
            # Redis down or slow, disk full, database gone: never a 2xx for an event not stored;
            # the platform retries a 503 later (and /healthz says 503).
            metrics.inc("gateway_webhook_requests_total", endpoint=endpoint.name, outcome="unavailable")
            rejections.log(logging.ERROR, "store", "webhook not stored: endpoint=%s: %s", endpoint.name, exc)
            raise Unavailable("the gateway cannot store events now; try again later") from exc
        if parsed.ignored:
            metrics.inc("gateway_events_total", parsed.ignored, endpoint=endpoint.name, outcome="ignored")
        metrics.inc("gateway_webhook_requests_total", endpoint=endpoint.name, outcome="accepted")
        response = _response(parsed.response)
        metrics.observe("gateway_webhook_ack_seconds", time.perf_counter() - started, endpoint.name)
        return response

    return handle
