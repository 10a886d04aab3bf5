"""``/webhooks/<endpoint>``: size check, verification and parsing by the channel adapter, then
every event committed to the durable inbox before the platform gets its answer."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiDict

from channels.base import WebhookChannel, WebhookRequest, WebhookResponse
from gateway.errors import RequestRejected
from gateway.keys import ADAPTERS, CLOCK, MANAGER, METRICS, SETTINGS
from gateway.logs import log_context
from gateway.settings import EndpointSettings

log = logging.getLogger("gateway.webhooks")


def public_url(request: web.Request, configured: str | None) -> str:
    """The URL the platform called: ``server.public_url`` + path + query; without it, rebuilt
    from X-Forwarded-Proto / X-Forwarded-Host, else the Host header (Twilio signs this URL)."""
    path_qs = request.raw_path  # path and query string, as sent (not re-encoded)
    if configured:
        return configured + path_qs
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
    host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
    return f"{scheme}://{host}{path_qs}"


async def to_webhook_request(request: web.Request, configured_public_url: str | None) -> WebhookRequest:
    body = await request.read()  # raises 413 past client_max_size, before anything else
    form = None
    if request.content_type == "application/x-www-form-urlencoded":
        form = MultiDict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return WebhookRequest(
        method=request.method,
        path=request.path,
        query=request.query,
        public_url=public_url(request, configured_public_url),
        headers=request.headers,
        body=body,
        content_type=request.content_type,
        form=form,
    )


def _response(answer: WebhookResponse) -> web.Response:
    return web.Response(
        status=answer.status, text=answer.text, content_type=answer.content_type, headers=dict(answer.headers)
    )


def webhook_handler(endpoint: EndpointSettings) -> Handler:
    """The POST (events) and GET (handshake) handler of one platform endpoint."""

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        app = request.app
        adapter = app[ADAPTERS][endpoint.name]
        assert isinstance(adapter, WebhookChannel)  # only webhook channels get this route
        metrics = app[METRICS]
        try:
            incoming = await to_webhook_request(request, app[SETTINGS].server.public_url)
            if request.method == "GET":
                return _response(adapter.handshake(incoming))
            parsed = adapter.parse_webhook(incoming)
        except RequestRejected as exc:
            metrics.inc("gateway_webhook_requests_total", endpoint=endpoint.name, outcome=f"rejected_{exc.status}")
            log.warning(
                "webhook rejected: endpoint=%s status=%d reason=%s",
                endpoint.name,
                exc.status,
                exc.reason,
                extra=log_context(endpoint.name),
            )
            raise
        arrival = app[CLOCK]()
        manager = app[MANAGER]
        # All events of the batch are committed (group-committed together) before the 2xx.
        await asyncio.gather(*(manager.accept(endpoint.name, event, arrival) for event in parsed.events))
        if parsed.ignored:
            metrics.inc("gateway_events_total", parsed.ignored, endpoint=endpoint.name, outcome="ignored")
        metrics.inc("gateway_webhook_requests_total", endpoint=endpoint.name, outcome="accepted")
        response = _response(parsed.response)
        metrics.observe("gateway_webhook_ack_seconds", time.perf_counter() - started, endpoint.name)
        return response

    return handle
