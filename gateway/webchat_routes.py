"""HTTP side of the web chat: the page, and the WebSocket that feeds the session manager."""

from __future__ import annotations

import logging

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from channels.webchat import WebChatAdapter, page_html, parse_client_frame
from gateway.errors import BadPayload, Overloaded
from gateway.keys import ADAPTERS, MANAGER, OUTBOX
from gateway.settings import EndpointSettings

log = logging.getLogger("gateway.webchat")

MAX_CONVERSATION_ID = 200


def page_handler(endpoint: EndpointSettings) -> Handler:
    html = page_html()

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=html, content_type="text/html")

    return page


def socket_handler(endpoint: EndpointSettings) -> Handler:
    """``GET /webchat/<name>/ws?conversation=<id>``: one browser tab of one conversation."""

    async def socket(request: web.Request) -> web.StreamResponse:
        conversation = request.query.get("conversation", "").strip()
        if not conversation or len(conversation) > MAX_CONVERSATION_ID:
            raise BadPayload("conversation query parameter (1-200 characters) is required")
        app = request.app
        adapter = app[ADAPTERS][endpoint.name]
        assert isinstance(adapter, WebChatAdapter)
        manager = app[MANAGER]
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        adapter.attach(conversation, ws)
        try:
            session = manager.open_session(endpoint.name, conversation)
            if session is not None:
                await adapter.send_frame(ws, {"type": "session", "state": "open", "session_id": session.id})
            app[OUTBOX].wake(endpoint.name, conversation)  # kept messages go out now, in order
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                event = parse_client_frame(conversation, frame.data)
                if event is None:
                    continue  # malformed client frames are ignored (contract)
                try:
                    await manager.accept(endpoint.name, event)
                except Overloaded as exc:  # not accepted: the user sees no echo and may resend
                    log.warning("web chat frame dropped for %s: %s", conversation, exc.reason)
        finally:
            adapter.detach(conversation, ws)
        return ws

    return socket
