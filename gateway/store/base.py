"""The storage interface the core depends on. Backends: ``sqlite.py`` (default), ``redis.py``.

Writes go through ``commit(Change)``: one atomic unit, group-committed with concurrent ones, so
a session's close and its closure notice exist together or not at all. ``add_inbound`` commits
an inbound event (with its dedup key) durably before the webhook is answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.models import Change, Contact, InboundEvent, OutboundMessage, Session, SessionState, StoredEvent


@dataclass(slots=True, frozen=True)
class SessionQuery:
    """Filter and page for ``list_sessions``; ``cursor`` is the opaque ``next`` of a prior page."""

    state: SessionState | None = None
    endpoint: str | None = None
    cursor: str | None = None
    limit: int = 100


class Store(Protocol):
    """Durable state of the gateway. Implementations must be safe to use from one event loop."""

    async def open(self) -> None:
        """Connect, take the single-process lock where needed, apply migrations.

        Raises ``StoreLocked`` when another gateway process uses the same database, and
        ``StoreError`` when it cannot be opened.
        """

    async def aclose(self) -> None:
        """Flush pending writes and close. Safe to call twice."""

    # -- inbox -------------------------------------------------------------------------------
    async def add_inbound(self, endpoint: str, event: InboundEvent, arrival_at: float) -> StoredEvent | None:
        """Commit an inbound event as pending; None when (endpoint, dedup_key) was seen before.

        A store may also read the conversation's contact as of that commit and hand it over
        (``StoredEvent.contact_known``): the message turn then does not read it again."""

    async def pending_inbound(self) -> list[StoredEvent]:
        """Events committed but not yet handled, in arrival order (id order)."""

    # -- writes ------------------------------------------------------------------------------
    async def commit(self, change: Change) -> None:
        """Apply ``change`` atomically. Assigns ``id`` to each new outbox message; an outbox
        message whose ``key`` exists already is not inserted again (its ``id`` is set to the
        existing row's)."""

    # -- sessions and contacts ---------------------------------------------------------------
    def open_sessions(self) -> AsyncIterator[Session]:
        """Every open session (for restore at start), streamed."""

    async def get_session(self, session_id: str) -> Session | None: ...

    async def list_sessions(self, query: SessionQuery) -> tuple[list[Session], str | None]:
        """A page of sessions, newest first, and the cursor of the next page (None at the end)."""

    async def get_contact(self, contact_id: str) -> Contact | None: ...

    async def get_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        """The contacts that exist among ``contact_ids``, by id (one query: mass expiry)."""

    async def contact_sessions(self, contact_id: str) -> list[Session]:
        """The contact's sessions (its conversation history, S6), newest first."""

    async def session_analytics(
        self, since: float | None, until: float | None
    ) -> list[tuple[str, bool, bool, str | None, int]]:
        """Sessions started in ``[since, until)`` (None: unbounded) counted by kind, in one
        aggregate query: ``(endpoint, interactive, developer, close_reason, count)`` per group,
        ``close_reason`` None for open sessions (S13-S15, ``GET /admin/analytics/sessions``)."""

    # -- outbox ------------------------------------------------------------------------------
    async def pending_outbox(self) -> list[OutboundMessage]:
        """Messages not yet sent, skipped or dead, in id order."""

    async def record_parts_sent(self, message_id: int, parts_sent: int) -> None:
        """Commit that the platform accepted the first ``parts_sent`` parts of a split message;
        only that column of the row changes."""

    async def dead_letters(self, limit: int = 100) -> list[OutboundMessage]: ...

    async def get_outbound(self, message_id: int) -> OutboundMessage | None: ...

    # -- runtime settings (admin API; they win over the file until deleted) -----------------
    async def get_overrides(self) -> dict[str, dict[str, Any]]:
        """scope -> settings, e.g. ``{"endpoint:web": {...}, "organisation": {...}}``."""

    async def put_override(self, scope: str, value: dict[str, Any]) -> None: ...

    async def delete_override(self, scope: str) -> None: ...

    # -- retention ---------------------------------------------------------------------------
    async def prune(self, before: float, *, holding_channels: Collection[str]) -> int:
        """Drop handled inbound events (their dedup ids) older than ``before``, and messages
        still pending from then for a channel of ``holding_channels`` (channels that keep a
        message until the user connects: web chat); returns how many rows went."""
