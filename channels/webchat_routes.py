"""HTTP side of the web chat: the page, the client's frames, and the WebSocket that feeds them
to the core (``channels.base.Inbox``). Routes are added by ``WebChatAdapter.add_routes``."""

from __future__ import annotations

import json
import logging
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from channels.base import Inbox
from gateway.errors import BadPayload, Overloaded
from gateway.models import EventKind, InboundEvent

if TYPE_CHECKING:
    from channels.webchat import WebChatAdapter

log = logging.getLogger("gateway.webchat")

MAX_CONVERSATION_ID = 200
MAX_TEXT_CHARS = 4000


def page_html() -> str:
    """The chat page served at ``GET /webchat/<name>``."""
    return resources.files("channels").joinpath("static/webchat.html").read_text(encoding="utf-8")


def parse_client_frame(conversation: str, data: str) -> InboundEvent | None:
    """A client frame as an inbound event; None for anything malformed (ignored, per contract)."""
    try:
        frame: Any = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(frame, dict):
        return None
    frame_id = f"webchat:{uuid.uuid4().hex}"
    if frame.get("type") == "message":
        text = frame.get("text")
        if not isinstance(text, str) or not text.strip():
            return None
        return InboundEvent(
            conversation=conversation,
            kind=EventKind.MESSAGE,
            dedup_key=frame_id,
            message_id=frame_id,
            text=text[:MAX_TEXT_CHARS],
            timestamp=time.time(),
        )
    if frame.get("type") == "refresh":
        return InboundEvent(conversation=conversation, kind=EventKind.REFRESH, dedup_key=frame_id)
    return None


def add_routes(router: web.UrlDispatcher, path: str, adapter: WebChatAdapter, inbox: Inbox) -> None:
    """``GET <path>`` the page, ``GET <path>/ws`` the socket."""
    router.add_get(path, page_handler())
    router.add_get(f"{path}/ws", socket_handler(adapter, inbox))


def page_handler() -> Handler:
    html = page_html()

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=html, content_type="text/html")

    return page


def socket_handler(adapter: WebChatAdapter, inbox: Inbox) -> Handler:
    """``GET /webchat/<name>/ws?conversation=<id>``: one browser tab of one conversation."""

    async def socket(request: web.Request) -> web.StreamResponse:
        conversation = request.query.get("conversation", "").strip()
        if not conversation or len(conversation) > MAX_CONVERSATION_ID:
            raise BadPayload("conversation query parameter (1-200 characters) is required")
        ws = web.WebSocketResponse(heartbeat=30.0)
        await ws.prepare(request)
        adapter.attach(conversation, ws)
        try:
            session_id = inbox.open_session_id(conversation)
            if session_id is not None:
                await adapter.send_frame(ws, {"type": "session", "state": "open", "session_id": session_id})
            inbox.wake(conversation)  # kept messages go out now, in order
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                event = parse_client_frame(conversation, frame.data)
                if event is None:
                    continue  # malformed client frames are ignored (contract)
                try:
                    await inbox.accept(event)
                except Overloaded as exc:  # not accepted: the user sees no echo and may resend
                    log.warning("web chat frame dropped for %s: %s", conversation, exc.reason)
        finally:
            adapter.detach(conversation, ws)
        return ws

    return socket
