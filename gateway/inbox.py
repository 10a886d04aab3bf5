"""The core as a hosted channel (web chat) sees it: ``channels.base.Inbox`` for one endpoint."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway.keys import CLOCK, MANAGER, OUTBOX, SETTINGS, STORE
from gateway.models import InboundEvent, Session, TranscriptLine, contact_id_of
from gateway.proxies import client_address


class EndpointInbox:
    """One endpoint's sessions and outbox, looked up in ``app`` on each call: routes are added
    before the session manager and the outbox start (cleanup contexts)."""

    def __init__(self, app: web.Application, endpoint: str) -> None:
        self._app = app
        self._endpoint = endpoint

    def open_session_id(self, conversation: str) -> str | None:
        session = self._app[MANAGER].open_session(self._endpoint, conversation)
        return session.id if session is not None else None

    async def last_session(self, conversation: str) -> Session | None:
        """The open session from memory, else the newest one in the store."""
        session = self._app[MANAGER].open_session(self._endpoint, conversation)
        if session is not None:
            return session
        history = await self._app[STORE].contact_sessions(contact_id_of(self._endpoint, conversation))
        return history[0] if history else None

    async def transcript(self, conversation: str, since: float, limit: int) -> list[TranscriptLine]:
        return await self._app[STORE].history(self._endpoint, conversation, since, limit)

    def client_address(self, request: web.Request) -> str:
        return client_address(request, self._app[SETTINGS].server.trusted_proxies) or "unknown"

    async def accept(self, event: InboundEvent) -> None:
        await self._app[MANAGER].accept(self._endpoint, event)

    def wake(self, conversation: str, ready: Callable[[], None]) -> None:
        self._app[OUTBOX].wake(self._endpoint, conversation, ready)

    async def add_conversation(self, conversation: str, secret_hash: str) -> None:
        await self._app[STORE].add_conversation_secret(self._endpoint, conversation, secret_hash, self._app[CLOCK]())

    async def conversation_secret(self, conversation: str) -> str | None:
        return await self._app[STORE].conversation_secret(self._endpoint, conversation)
