"""Which conversations this process owns: the one seam the session core has for several instances.

A conversation is handled (its events, its timer, its outbox lane) by one owner at a time, so
its order holds whichever instance took the webhook. With one process (SQLite) that owner is
always this process: ``SoleOwner``, where every call is trivial and the SQLite path is exactly
what it was. With several instances sharing Redis, ``gateway.store.redis_ownership`` holds a
lease with a fencing token per conversation, forwards events and admin actions to the owner
and takes over the conversations of an instance that died.

The session manager asks:

- ``owns_everything``: restore every open session and pending event at start (SoleOwner), or
  start empty and take conversations over as they come (Redis, through ``OwnershipHost.adopt``);
- ``admit(stored)``: an event this process accepted for a conversation it owns; the events to
  queue now, in the conversation's order (an earlier one accepted elsewhere may come first);
- ``holds`` / ``close_elsewhere`` / ``bot_message_elsewhere``: an operator action for a
  conversation this process does not hold goes to the instance that does;
- ``forgotten(endpoint, conversation)``: the conversation has no session and no work here any
  more (its lease may go);
- ``deadlines_moved(deadlines)``: a changed setting moves these open sessions' deadlines.

The application starts it before the outbox and the session manager, ``bind``s them once they
run, asks ``problem`` for ``/healthz``, says ``settings_changed`` after an admin change, and
closes it after them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from gateway.models import OutboundMessage, Session, StoredEvent
from gateway.sessions.state import OutboxSink


class OwnershipHost(Protocol):
    """What the ownership layer calls on the session manager."""

    async def adopt(self, sessions: list[Session], events: list[StoredEvent]) -> None: ...

    def enqueue(self, events: list[StoredEvent]) -> None: ...

    def has_conversation(self, endpoint: str, conversation: str) -> bool: ...

    async def close(self, session_id: str, *, notify: bool = True) -> Session: ...

    async def send_bot_message(self, endpoint: str, conversation: str, text: str) -> Session: ...


SettingsListener = Callable[[], Awaitable[None]]


class Ownership(Protocol):
    """Conversation ownership, as the session manager and the application use it."""

    @property
    def owns_everything(self) -> bool: ...

    @property
    def stores_deadlines(self) -> bool:
        """Whether ``deadlines_moved`` must hear of every deadline a changed setting moves."""
        ...

    async def start(self) -> None:
        """Join (several instances: register this instance's heartbeat)."""

    def bind(self, host: OwnershipHost, outbox: OutboxSink, on_settings: SettingsListener) -> None:
        """The session manager and the outbox run: start taking conversations over."""

    async def aclose(self) -> None:
        """Leave: other instances take this one's conversations over. Idempotent."""

    def problem(self) -> str | None:
        """None while this instance can do its part (``/healthz``; the store's own health is
        ``Store.check_writable``), else why it cannot."""
        ...

    async def admit(self, stored: StoredEvent) -> list[StoredEvent]:
        """Events to queue now, in order, for an event accepted here for an owned conversation."""
        ...

    def holds(self, endpoint: str, conversation: str) -> bool:
        """Whether this process handles the conversation now."""
        ...

    async def close_elsewhere(self, session: Session, notify: bool) -> Session:
        """Close ``session`` through the instance that holds its conversation."""
        ...

    async def bot_message_elsewhere(self, endpoint: str, conversation: str, text: str) -> Session:
        """A bot-initiated message through the instance that holds the conversation."""
        ...

    async def forward_message(self, message: OutboundMessage) -> bool:
        """A message made pending again here (a dead letter retried): True when another
        instance delivers it (its conversation's owner), False to deliver it here."""
        ...

    def forgotten(self, endpoint: str, conversation: str) -> None:
        """The conversation has no open session and no work in this process any more."""

    async def deadlines_moved(self, deadlines: list[tuple[str, float | None]]) -> None:
        """(session id, new deadline) of open sessions a changed setting moves; a shared store
        keeps them (before memory follows)."""

    async def settings_changed(self) -> None:
        """Runtime settings changed through this instance: tell the others."""


class SoleOwner:
    """One process owns every conversation (the SQLite backend): nothing to decide."""

    owns_everything = True
    stores_deadlines = False

    def __repr__(self) -> str:
        return "<SoleOwner>"

    async def start(self) -> None:
        pass

    def bind(self, host: OwnershipHost, outbox: OutboxSink, on_settings: SettingsListener) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def problem(self) -> str | None:
        return None

    async def admit(self, stored: StoredEvent) -> list[StoredEvent]:
        return [stored]

    def holds(self, endpoint: str, conversation: str) -> bool:
        return True

    async def close_elsewhere(self, session: Session, notify: bool) -> Session:
        raise AssertionError("one process holds every conversation")

    async def bot_message_elsewhere(self, endpoint: str, conversation: str, text: str) -> Session:
        raise AssertionError("one process holds every conversation")

    async def forward_message(self, message: OutboundMessage) -> bool:
        return False

    def forgotten(self, endpoint: str, conversation: str) -> None:
        pass

    async def deadlines_moved(self, deadlines: list[tuple[str, float | None]]) -> None:
        pass

    async def settings_changed(self) -> None:
        pass
