"""The gateway's own web chat: a page, an embeddable widget, a WebSocket per browser tab, JSON
frames (DESIGN.md "HTTP surface" and "Web chat in public"; ``channels.webchat_routes`` has the
socket's life).

Conversations are issued by the server (id and token in the ``hello``); a socket is only ever
attached to a conversation whose token it presented. A message for a conversation with no
socket raises ``DeliveryDeferred(keep=max_kept_messages)``: the outbox keeps it in the store,
not in memory, and reads it back when a socket of that conversation connects.

The adapter is a ``HostedChannel`` and a ``SessionListener`` (``channels.base``): it serves the
page and the socket itself and hears of session changes.
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
from channels.webchat_guard import DropLog, KeyedBuckets, OriginPolicy
from gateway.errors import DeliveryDeferred
from gateway.models import MessageKind, OutboundMessage
from gateway.settings import EndpointSettings

log = logging.getLogger("channels.webchat")

Sockets = dict[str, set[web.WebSocketResponse]]


class WebChatAdapter:
    """The sockets of one web chat endpoint, by conversation, and the frames written to them.

    A socket *joins* its conversation after the hello (it gets session frames from then on) and
    is *ready* once the outbox has queued the conversation's kept messages ahead of it (it gets
    messages from then on, so nothing overtakes them).
    """

    channel = "webchat"

    def __init__(
        self,
        endpoint: EndpointSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.origins = OriginPolicy(endpoint.webchat.allowed_origins)
        self.new_conversations = KeyedBuckets(endpoint.webchat.max_new_conversations_per_hour, 3600.0)
        self.refusals = DropLog(log, f"web chat {endpoint.name}: connections")
        self._clock = clock
        self._joined: Sockets = {}
        self._ready: Sockets = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, http: aiohttp.ClientSession) -> None:
        return None

    def add_routes(self, router: web.UrlDispatcher, path: str, inbox: Inbox) -> None:
        """The page at ``path``, ``<path>/widget.js`` and the WebSocket at ``<path>/ws``."""
        webchat_routes.add_routes(router, path, self, inbox)

    async def aclose(self) -> None:
        """Close every socket (aiohttp's on_shutdown calls this before cleanup). Safe twice."""
        sockets = [ws for group in self._joined.values() for ws in group]
        self._joined.clear()
        self._ready.clear()
        for ws in sockets:
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutdown")
        for task in list(self._tasks):
            task.cancel()
        self.refusals.flush()

    def join(self, conversation: str, ws: web.WebSocketResponse) -> None:
        self._joined.setdefault(conversation, set()).add(ws)

    def ready(self, conversation: str, ws: web.WebSocketResponse) -> None:
        """The conversation's kept messages are queued: ``ws`` gets messages from now on."""
        if ws in self._joined.get(conversation, ()) and not ws.closed:
            self._ready.setdefault(conversation, set()).add(ws)

    def leave(self, conversation: str, ws: web.WebSocketResponse) -> None:
        for sockets in (self._joined, self._ready):
            group = sockets.get(conversation)
            if group is not None:
                group.discard(ws)
                if not group:
                    del sockets[conversation]

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """One frame with the whole text (no parts: a socket takes any length)."""
        kind = "closure" if message.kind is MessageKind.CLOSURE else "reply"
        frame = {"type": "message", "text": message.text, "kind": kind}
        if not await self._broadcast(self._ready, message.conversation, frame):
            raise DeliveryDeferred(keep=self.endpoint.webchat.max_kept_messages)

    def session_changed(self, conversation: str, state: str, session_id: str) -> None:
        """Tell the conversation's sockets that its session opened or closed (not persisted:
        a socket that connects later is told the current state when it joins)."""
        if not self._joined.get(conversation):
            return
        frame = {"type": "session", "state": state, "session_id": session_id}
        task = asyncio.get_running_loop().create_task(self._broadcast_quietly(conversation, frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _broadcast_quietly(self, conversation: str, frame: dict[str, Any]) -> None:
        await self._broadcast(self._joined, conversation, frame)

    async def _broadcast(self, sockets: Sockets, conversation: str, frame: dict[str, Any]) -> bool:
        delivered = False
        for ws in list(sockets.get(conversation, ())):
            if ws.closed:
                self.leave(conversation, ws)
                continue
            try:
                await ws.send_json(frame)
                delivered = True
            except (ConnectionError, RuntimeError) as exc:
                log.info("web chat socket gone for %s: %s", conversation, exc)
                self.leave(conversation, ws)
        return delivered
