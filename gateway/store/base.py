"""The storage interface the core depends on. Backends: ``sqlite.py`` (default), ``redis.py``.

Writes go through ``commit(Change)``: one atomic unit (group-committed with concurrent ones on
SQLite, one Lua script on Redis), so a session's close and its closure notice exist together or
not at all. ``add_inbound`` commits
an inbound event (with its dedup key) durably before the webhook is answered.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.models import (
    Change,
    Contact,
    InboundEvent,
    OutboundMessage,
    Session,
    SessionState,
    StoredEvent,
    TranscriptEntry,
    TranscriptLine,
)


@dataclass(slots=True, frozen=True)
class SessionQuery:
    """Filter and page for ``list_sessions``; ``cursor`` is the opaque ``next`` of a prior page."""

    state: SessionState | None = None
    endpoint: str | None = None
    cursor: str | None = None
    limit: int = 100


def encode_cursor(session: Session) -> str:
    """The opaque ``list_sessions`` cursor after ``session`` (its sort key, base64 JSON); both
    stores give out the same form."""
    return base64.urlsafe_b64encode(json.dumps([session.started_at, session.id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The sort key in a cursor; ValueError for anything ``encode_cursor`` did not produce."""
    try:
        started_at, session_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(started_at), str(session_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


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
    async def add_inbound(
        self, endpoint: str, event: InboundEvent, arrival_at: float, *, extends_to: float | None = None
    ) -> StoredEvent | None:
        """Commit an inbound event as pending; None when (endpoint, dedup_key) was seen before.

        ``extends_to``: the deadline the conversation's open session moves to when the event is a
        user interaction arriving before its deadline. A store shared by several instances moves
        it in the same step (the owner may be another instance); a single-process store may
        ignore it (the session manager moves it in memory).

        A store may also read the conversation's contact as of that commit and hand it over
        (``StoredEvent.contact_known``): the message turn then does not read it again.
        """

    async def pending_inbound(self) -> list[StoredEvent]:
        """Events committed but not yet handled, in arrival order (id order)."""

    # -- writes ------------------------------------------------------------------------------
    def commit(self, change: Change) -> Awaitable[None]:
        """Apply ``change`` atomically. Assigns ``id`` to each new outbox message; an outbox
        message whose ``key`` exists already is not inserted again (its ``id`` is set to the
        existing row's).

        A coroutine, or an ``asyncio.Future`` when the write is queued before this returns and
        applied whether or not anyone awaits it (then callers need not shield it)."""

    # -- sessions and contacts ---------------------------------------------------------------
    def open_sessions(self) -> AsyncIterator[list[Session]]:
        """Every open session (for restore at start), streamed a chunk at a time (a step of an
        async generator per session cost more than building the session, a million times)."""

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

    async def history(self, endpoint: str, conversation: str, since: float, limit: int) -> list[TranscriptLine]:
        """The conversation's lines as its user saw them (the web chat's history frame) from
        ``since`` on, oldest first, at most the last ``limit``:
        its user messages and postbacks with a text and its refreshes (kind ``refresh``, empty
        text) from the inbox, by arrival time, and the messages sent to it (outbox rows in state
        ``sent``), by creation time. Lines of the same time: user first. Pruned rows are gone."""

    # -- outbox ------------------------------------------------------------------------------
    async def pending_outbox(self, *, skip_channels: Collection[str] = ()) -> list[OutboundMessage]:
        """Messages not yet sent, skipped or dead, in id order; none of ``skip_channels`` (the
        channels that keep messages for the user, read per conversation when it connects)."""

    async def pending_outbox_of(self, endpoint: str, conversation: str) -> list[OutboundMessage]:
        """The pending messages of one conversation, in id order (a web chat conversation's
        kept messages, read when it reconnects)."""

    async def record_parts_sent(self, message_id: int, parts_sent: int) -> None:
        """Commit that the platform accepted the first ``parts_sent`` parts of a split message;
        only that column of the row changes."""

    async def dead_letters(self, limit: int = 100) -> list[OutboundMessage]: ...

    async def get_outbound(self, message_id: int) -> OutboundMessage | None: ...

    async def count_dead_letters(self) -> int:
        """How many dead letters the store holds (the ``gateway_dead_letters`` gauge)."""

    async def delete_dead_letter(self, message_id: int) -> bool:
        """Drop the outbox message ``message_id`` if it is a dead letter; False when there was
        no such dead letter (``DELETE /admin/dead-letters/<id>``)."""

    async def transcript(
        self, endpoint: str, conversation: str, since: float, until: float, limit: int
    ) -> list[TranscriptEntry]:
        """The conversation's messages in ``[since, until]``, oldest first, at most the newest
        ``limit``: user messages and postbacks from the inbox (handled or not; other event
        kinds left out) and every outbox message, whatever its state."""

    # -- runtime settings (admin API; they win over the file until deleted) -----------------
    async def get_overrides(self) -> dict[str, dict[str, Any]]:
        """scope -> settings, e.g. ``{"endpoint:web": {...}, "organisation": {...}}``."""

    async def put_override(self, scope: str, value: dict[str, Any]) -> None: ...

    async def delete_override(self, scope: str) -> None: ...

    # -- health ------------------------------------------------------------------------------
    async def check_writable(self) -> str | None:
        """None when a write can commit now; else the reason it cannot (``/healthz`` answers
        503 with it). Cheap enough to run once a second."""

    # -- conversations the gateway issues (web chat) --------------------------------------------
    async def add_conversation_secret(
        self, endpoint: str, conversation: str, secret_hash: str, created_at: float
    ) -> None:
        """Record a conversation the gateway issued and the hash of its secret (the token
        itself is never stored), durably: a client resumes it after a restart."""

    async def conversation_secret(self, endpoint: str, conversation: str) -> str | None:
        """The secret hash recorded for the conversation; None when it was never issued (or
        pruned)."""

    # -- retention and erasure -----------------------------------------------------------------
    async def prune(self, before: float, *, holding_channels: Collection[str]) -> int:
        """Drop handled inbound events (their dedup ids) older than ``before``, messages still
        pending from then for a channel of ``holding_channels`` (channels that keep a message
        until the user connects: web chat), and issued conversations created before then that
        never had a session; returns how many rows went."""

    async def prune_history(self, *, closed_sessions_before: float, messages_before: float) -> int:
        """Retention (``retention.closed_sessions_days``, ``messages_days``): drop sessions
        closed before ``closed_sessions_before``; then contacts left with no session whose last
        message (else creation) is older than that too, except opted-out ones (their opt-out
        must hold); and sent or skipped outbox messages created before ``messages_before``.
        Open sessions, pending messages and dead letters are kept. Returns how many rows went.
        Work is chunked so that other writes interleave."""

    async def erase_contact(self, endpoint: str, conversation: str) -> int:
        """Erase a contact (``DELETE /admin/contacts/<id>``): its profile (variables, auth
        profiles), every session of it, every outbox message of its conversation, and its
        handled inbound events. The caller closes its open session first. Returns how many
        rows went (0: nothing was known of it)."""
