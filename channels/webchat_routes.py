"""HTTP side of the web chat: the page, ``widget.js``, and the WebSocket that feeds the
client's frames to the core (``channels.base.Inbox``). Routes are added by
``WebChatAdapter.add_routes``.

A socket's life (DESIGN.md "Web chat in public"):

1. ``Origin`` must be the gateway's own or listed in ``webchat.allowed_origins``: else 403.
2. ``?conversation=<id>&token=<secret>`` resumes an issued conversation whose token matches
   (only a SHA-256 of the token is stored). Anything else is a new conversation: the client
   address's hourly budget is charged (429 when spent) and a fresh id and token (128 and 256
   random bits) are recorded durably before the hello names them.
3. Frames out: ``hello``; on a resume ``history`` (the open session's transcript, or the last
   closed one's; empty after a refresh) and the session's state; then the messages kept while
   no socket was connected, read from the store, in order; then whatever comes.
4. Frames in: at most ``max_messages_per_minute`` per socket (excess: an ``error`` frame
   ``rate_limited``, dropped); a message longer than ``max_text_chars`` gets ``too_long``;
   malformed frames are ignored. A frame's ``id`` is acknowledged (``ack``) once the event is
   durable; a repeated id in the conversation is acknowledged again and not handled twice.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from channels.base import Inbox
from channels.webchat_guard import Bucket, DropLog, address_key
from channels.webchat_page import render_page, render_widget
from gateway.errors import BadPayload, Forbidden, Overloaded, StoreError, TooManyRequests
from gateway.models import CloseReason, EventKind, InboundEvent, Session, TranscriptLine

if TYPE_CHECKING:
    from channels.webchat import WebChatAdapter

log = logging.getLogger("channels.webchat")

HISTORY_LIMIT = 200  # lines of the transcript a resuming socket gets
MAX_CLIENT_ID = 64
_CONVERSATION_ID = re.compile(r"[0-9a-f]{32}")  # what new_identity issues
_MAX_TOKEN = 128


def secret_hash(token: str) -> str:
    """What the store keeps of a conversation's token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_identity() -> tuple[str, str]:
    """A new conversation id (128 random bits) and its token (256 random bits)."""
    return secrets.token_hex(16), secrets.token_urlsafe(32)


@dataclass(slots=True, frozen=True)
class ClientFrame:
    """A client frame as the core takes it, or why it is refused (``malformed``, ``too_long``)."""

    event: InboundEvent | None
    client_id: str | None = None
    refused: str | None = None


def frame_id(frame: Any) -> str | None:
    """The client's ``id`` of a frame, when it is a usable one."""
    if not isinstance(frame, dict):
        return None
    value = frame.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= MAX_CLIENT_ID else None


def parse_client_frame(conversation: str, data: str, max_text_chars: int) -> ClientFrame:
    """A client frame as an inbound event. The dedup key is the client's id in this
    conversation (a resend is a redelivery), else a random one."""
    try:
        frame: Any = json.loads(data)
    except (ValueError, RecursionError):
        return ClientFrame(None, refused="malformed")
    client_id = frame_id(frame)
    if not isinstance(frame, dict) or ("id" in frame and client_id is None):
        return ClientFrame(None, refused="malformed")
    key = f"webchat:{conversation}:{client_id}" if client_id else f"webchat:{uuid.uuid4().hex}"
    if frame.get("type") == "message":
        text = frame.get("text")
        if not isinstance(text, str) or not text.strip():
            return ClientFrame(None, client_id, refused="malformed")
        if len(text) > max_text_chars:
            return ClientFrame(None, client_id, refused="too_long")
        event = InboundEvent(
            conversation=conversation,
            kind=EventKind.MESSAGE,
            dedup_key=key,
            message_id=client_id or key,
            text=text,
            timestamp=time.time(),
        )
        return ClientFrame(event, client_id)
    if frame.get("type") == "refresh":
        return ClientFrame(InboundEvent(conversation=conversation, kind=EventKind.REFRESH, dedup_key=key), client_id)
    return ClientFrame(None, refused="malformed")


def history_frame(lines: list[TranscriptLine]) -> dict[str, Any]:
    """The ``history`` frame: user lines with the client's id, bot lines as ``reply`` or ``closure``."""
    messages: list[dict[str, Any]] = []
    for line in lines:
        if line.sender == "user":
            entry: dict[str, Any] = {"from": "user", "text": line.text, "kind": "message"}
            if line.message_id is not None:
                entry["id"] = line.message_id
        else:
            entry = {"from": "bot", "text": line.text, "kind": "closure" if line.kind == "closure" else "reply"}
        messages.append(entry)
    return {"type": "history", "messages": messages}


def add_routes(router: web.UrlDispatcher, path: str, adapter: WebChatAdapter, inbox: Inbox) -> None:
    """``GET <path>`` the page, ``GET <path>/widget.js``, ``GET <path>/ws`` the socket."""
    router.add_get(path, page_handler(adapter, path))
    router.add_get(f"{path}/widget.js", widget_handler(adapter, path))
    router.add_get(f"{path}/ws", socket_handler(adapter, inbox))


def page_handler(adapter: WebChatAdapter, path: str) -> Handler:
    page = render_page(adapter.endpoint, path)
    # Only the gateway itself and the allowed origins may show the page in a frame (widget.js).
    headers = {
        "Content-Security-Policy": f"frame-ancestors {adapter.origins.frame_ancestors()}",
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }

    async def serve_page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=page, content_type="text/html", headers=headers)

    return serve_page


def widget_handler(adapter: WebChatAdapter, path: str) -> Handler:
    script = render_widget(adapter.endpoint, path)
    headers = {"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"}

    async def serve_widget(request: web.Request) -> web.StreamResponse:
        return web.Response(text=script, content_type="application/javascript", headers=headers)

    return serve_widget


@dataclass(slots=True, frozen=True)
class _Identity:
    conversation: str
    token: str
    resumed: bool


async def _identify(request: web.Request, adapter: WebChatAdapter, inbox: Inbox) -> _Identity:
    """Resume the conversation the query names if its token matches; else issue a new one
    (charged to the client address; ``TooManyRequests`` when its budget is spent)."""
    conversation = request.query.get("conversation", "")
    token = request.query.get("token", "")
    if _CONVERSATION_ID.fullmatch(conversation) and 0 < len(token) <= _MAX_TOKEN:
        stored = await inbox.conversation_secret(conversation)
        if stored is not None and hmac.compare_digest(stored, secret_hash(token)):
            return _Identity(conversation, token, resumed=True)
    if not adapter.new_conversations.take(address_key(inbox.client_address(request))):
        adapter.refusals.count("new_conversation_limit")
        raise TooManyRequests("too many new conversations from this address; try again later")
    conversation, token = new_identity()
    await inbox.add_conversation(conversation, secret_hash(token))
    return _Identity(conversation, token, resumed=False)


async def _send(ws: web.WebSocketResponse, frame: dict[str, Any]) -> bool:
    """Send a frame; False when the client is gone."""
    try:
        await ws.send_json(frame)
    except (ConnectionError, RuntimeError):
        return False
    return True


async def _greet(ws: web.WebSocketResponse, adapter: WebChatAdapter, inbox: Inbox, who: _Identity) -> None:
    """Hello; on a resume the history and the session's state; then the socket joins (session
    frames) and, once its kept messages are queued ahead, receives messages."""
    await ws.send_json({"type": "hello", "conversation": who.conversation, "token": who.token})
    latest: Session | None = None
    if who.resumed:
        latest = await inbox.last_session(who.conversation)
        if latest is not None and latest.close_reason is CloseReason.REFRESH:
            latest = None  # the user started afresh (also once the refresh's own row is pruned)
        lines = await inbox.transcript(who.conversation, latest.started_at, HISTORY_LIMIT) if latest else []
        refreshes = [n for n, line in enumerate(lines) if line.kind == EventKind.REFRESH]
        if refreshes:  # "New conversation": the user started afresh there
            lines = lines[refreshes[-1] + 1 :]
            latest = None
        await ws.send_json(history_frame(lines))
    adapter.join(who.conversation, ws)
    open_id = inbox.open_session_id(who.conversation)  # after join: no change can slip between
    if open_id is not None:
        await ws.send_json({"type": "session", "state": "open", "session_id": open_id})
    elif latest is not None:
        await ws.send_json({"type": "session", "state": "closed", "session_id": latest.id})
    if who.resumed:
        inbox.wake(who.conversation, lambda: adapter.ready(who.conversation, ws))
    else:  # nobody else knows the id yet: nothing can be kept for it
        adapter.ready(who.conversation, ws)


def socket_handler(adapter: WebChatAdapter, inbox: Inbox) -> Handler:
    """``GET /webchat/<name>/ws[?conversation=<id>&token=<secret>]``: one browser tab."""
    settings = adapter.endpoint.webchat
    # A frame longer than a maximal message in JSON (every character escaped) is cut off by aiohttp.
    max_frame = max(4096, 6 * settings.max_text_chars + 1024)

    async def socket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max_frame)
        if not ws.can_prepare(request).ok:  # checked first: a plain GET issues no conversation
            raise BadPayload("this route takes a WebSocket upgrade")
        if not adapter.origins.allows(request):
            adapter.refusals.count("origin")
            raise Forbidden("this origin may not use the chat")
        who = await _identify(request, adapter, inbox)
        await ws.prepare(request)
        address = inbox.client_address(request)
        drops = DropLog(log, f"web chat {adapter.endpoint.name}: socket of {who.conversation} from {address}")
        frames = Bucket.full(settings.max_messages_per_minute, 60.0, time.monotonic())
        try:
            await _greet(ws, adapter, inbox, who)
            async for message in ws:
                if not frames.take(time.monotonic()):
                    drops.count("rate_limited")
                    data = message.data if message.type is WSMsgType.TEXT else None
                    if not await _send(ws, _error("rate_limited", _peek_id(data))):
                        break
                    continue
                if message.type is not WSMsgType.TEXT:
                    drops.count("malformed")
                    continue
                if not await _handle(
                    ws, inbox, drops, parse_client_frame(who.conversation, message.data, settings.max_text_chars)
                ):
                    break
        except ConnectionError:
            pass  # the client went away mid-greeting
        finally:
            adapter.leave(who.conversation, ws)
            drops.flush()
        return ws

    return socket


async def _handle(ws: web.WebSocketResponse, inbox: Inbox, drops: DropLog, frame: ClientFrame) -> bool:
    """Take one client frame; False when the client is gone."""
    if frame.event is None:
        drops.count(frame.refused or "malformed")
        if frame.refused == "too_long":
            return await _send(ws, _error("too_long", frame.client_id))
        return True  # malformed frames are ignored (contract)
    try:
        await inbox.accept(frame.event)
    except Overloaded:  # not accepted: the client resends it later (no ack)
        drops.count("overloaded")
        return await _send(ws, _error("overloaded", frame.client_id))
    except StoreError:  # the store is down (Redis): not accepted either, resent later
        drops.count("unavailable")
        return await _send(ws, _error("unavailable", frame.client_id))
    if frame.client_id is None:
        return True
    return await _send(ws, {"type": "ack", "id": frame.client_id})


def _error(reason: str, client_id: str | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "reason": reason}
    if client_id is not None:
        frame["id"] = client_id
    return frame


def _peek_id(data: str | None) -> str | None:
    if data is None:
        return None
    try:
        return frame_id(json.loads(data))
    except ValueError:
        return None
