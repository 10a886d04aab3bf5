"""The core as a hosted channel (web chat) sees it: ``channels.base.Inbox`` for one endpoint."""

from __future__ import annotations

from aiohttp import web

from gateway.keys import MANAGER, OUTBOX
from gateway.models import InboundEvent


class EndpointInbox:
    """One endpoint's sessions and outbox, looked up in ``app`` on each call: routes are added
    before the session manager and the outbox start (cleanup contexts)."""

    def __init__(self, app: web.Application, endpoint: str) -> None:
        self._app = app
        self._endpoint = endpoint

    def open_session_id(self, conversation: str) -> str | None:
        session = self._app[MANAGER].open_session(self._endpoint, conversation)
        return session.id if session is not None else None

    async def accept(self, event: InboundEvent) -> None:
        await self._app[MANAGER].accept(self._endpoint, event)

    def wake(self, conversation: str) -> None:
        self._app[OUTBOX].wake(self._endpoint, conversation)
