"""The gateway's own web chat: a page, a WebSocket per browser tab, JSON frames.

Client frames: ``{"type":"message","text"}`` and ``{"type":"refresh"}``. Server frames:
``{"type":"message","text","kind":"reply"|"closure"}`` and
``{"type":"session","state":"open"|"closed","session_id"}``. A message for a conversation with
no socket raises ``DeliveryDeferred``: the outbox keeps it (persisted) and resumes the lane when
a socket for that conversation connects, so it is delivered once, in order.

The adapter is a ``HostedChannel`` and a ``SessionListener`` (``channels.base``): it serves the
page and the socket itself (``channels.webchat_routes``) and hears of session changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from channels import webchat_routes
from channels.base import Inbox, Progress
from gateway.errors import DeliveryDeferred
from gateway.models import MessageKind, OutboundMessage
from gateway.settings import EndpointSettings

log = logging.getLogger("channels.webchat")


class WebChatAdapter:
    """Tracks the open sockets of each conversation of one web chat endpoint and writes frames."""

    channel = "webchat"

    def __init__(self, endpoint: EndpointSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._sockets: dict[str, set[web.WebSocketResponse]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, http: aiohttp.ClientSession) -> None:
        return None

    def add_routes(self, router: web.UrlDispatcher, path: str, inbox: Inbox) -> None:
        """The page at ``path`` and its WebSocket at ``<path>/ws``."""
        webchat_routes.add_routes(router, path, self, inbox)

    async def aclose(self) -> None:
        """Close every socket (aiohttp's on_shutdown calls this before cleanup). Safe twice."""
        sockets = [ws for group in self._sockets.values() for ws in group]
        self._sockets.clear()
        for ws in sockets:
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
        for task in list(self._tasks):
            task.cancel()

    def attach(self, conversation: str, ws: web.WebSocketResponse) -> None:
        self._sockets.setdefault(conversation, set()).add(ws)

    def detach(self, conversation: str, ws: web.WebSocketResponse) -> None:
        group = self._sockets.get(conversation)
        if group is not None:
            group.discard(ws)
            if not group:
                del self._sockets[conversation]

    def connected(self, conversation: str) -> bool:
        return bool(self._sockets.get(conversation))

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """One frame with the whole text (no parts: a socket takes any length)."""
        kind = "closure" if message.kind is MessageKind.CLOSURE else "reply"
        frame = {"type": "message", "text": message.text, "kind": kind}
        if not await self._broadcast(message.conversation, frame):
            raise DeliveryDeferred()

    def session_changed(self, conversation: str, state: str, session_id: str) -> None:
        """Tell the conversation's sockets that its session opened or closed (not persisted:
        a socket that connects later is told the current state on connect)."""
        if not self.connected(conversation):
            return
        frame = {"type": "session", "state": state, "session_id": session_id}
        task = asyncio.get_running_loop().create_task(self._broadcast_quietly(conversation, frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_frame(self, ws: web.WebSocketResponse, frame: dict[str, Any]) -> None:
        await ws.send_json(frame)

    async def _broadcast_quietly(self, conversation: str, frame: dict[str, Any]) -> None:
        await self._broadcast(conversation, frame)

    async def _broadcast(self, conversation: str, frame: dict[str, Any]) -> bool:
        delivered = False
        for ws in list(self._sockets.get(conversation, ())):
            if ws.closed:
                self.detach(conversation, ws)
                continue
            try:
                await ws.send_json(frame)
                delivered = True
            except (ConnectionError, RuntimeError) as exc:
                log.info("web chat socket gone for %s: %s", conversation, exc)
                self.detach(conversation, ws)
        return delivered
