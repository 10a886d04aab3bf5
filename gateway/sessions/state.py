"""In-memory types of the session core: a conversation's slot, its work items, counters."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum

from gateway.models import CloseReason, OutboundMessage, Session, StoredEvent


class OutboxSink:
    """What the manager needs of the outbox: take committed messages for delivery."""

    def submit(self, messages: Iterable[OutboundMessage]) -> None:
        raise NotImplementedError


class SlotState(IntEnum):
    """Who has a conversation in hand; written by the scheduler only."""

    IDLE = 0  # nothing queued, no worker
    WORKING = 1  # a worker handles the queue
    CLOSING = 2  # held by the batch closer: new items queue up until it releases the slot


@dataclass(slots=True)
class ExpireItem:
    """The session's timer fired while its conversation was busy: close it if still due."""

    session_id: str


@dataclass(slots=True)
class CloseItem:
    """An operator closes the session (admin API)."""

    session_id: str
    reason: CloseReason
    notify: bool
    done: asyncio.Future[Session]


@dataclass(slots=True)
class BotMessageItem:
    """A bot-initiated message (S13)."""

    text: str
    done: asyncio.Future[Session]


@dataclass(slots=True)
class ClearProfilesItem:
    """A close script asked to clear these auth profiles (S12)."""

    names: list[str]


@dataclass(slots=True)
class EraseItem:
    """An operator erases the contact (admin API): close its open session silently, then
    delete everything of it. ``done`` gets the number of rows deleted."""

    done: asyncio.Future[int]


WorkItem = StoredEvent | ExpireItem | CloseItem | BotMessageItem | ClearProfilesItem | EraseItem


class Conversation:
    """In-memory state of one conversation: its open session, timer and pending work.

    Kept deliberately small (slots, no per-instance dict): a million of these must fit in
    about 1 KiB each together with their sessions.
    """

    __slots__ = ("endpoint", "conversation", "session", "armed_at", "queue", "state")

    def __init__(self, endpoint: str, conversation: str) -> None:
        self.endpoint = endpoint
        self.conversation = conversation
        self.session: Session | None = None
        # Deadline of the slot's live timer entry (``SessionTimers``), None when not armed.
        self.armed_at: float | None = None
        self.queue: deque[WorkItem] | None = None
        self.state = SlotState.IDLE

    def __lt__(self, other: Conversation) -> bool:
        """Timer entries ``(when, slot)`` with equal ``when`` compare their slots: any order will do."""
        return False


@dataclass(slots=True)
class ManagerStats:
    """Counters for tests and benchmarks. With ``record_lags`` on, ``fire_lags_s`` holds when each
    due timer ran and ``close_lags_s`` when its close committed, both minus the deadline."""

    timer_fires: int = 0
    timer_rearms: int = 0
    closes_committed: int = 0
    record_lags: bool = False
    fire_lags_s: list[float] = field(default_factory=list)
    close_lags_s: list[float] = field(default_factory=list)
