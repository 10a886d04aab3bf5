"""Channel-neutral data: sessions, contacts, inbound events, outbound messages.

Times are POSIX timestamps (float seconds, UTC wall clock). They are converted to ISO 8601 only
at the JSON edge (``gateway.wire``). Floats rather than datetimes keep an open session small in
memory (the 1 KiB-per-session budget of bench/sessions.py) and make deadlines trivially
comparable; loop time never leaves memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

JSONDict = dict[str, Any]


class SessionState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class CloseReason(StrEnum):
    INACTIVITY = "inactivity"
    REFRESH = "refresh"
    ADMIN = "admin"
    FLOW = "flow"
    ENDPOINT_REMOVED = "endpoint_removed"


class EventKind(StrEnum):
    """What an inbound event is. Only MESSAGE and POSTBACK are user interactions (S16)."""

    MESSAGE = "message"
    POSTBACK = "postback"
    REFRESH = "refresh"  # web chat "new conversation" (S17)
    OPT_OUT = "opt_out"  # Twilio STOP & co: contact opted out, nothing reaches the flow
    OPT_IN = "opt_in"  # Twilio START & co


class MessageKind(StrEnum):
    REPLY = "reply"  # the flow's answer to a user event
    CLOSURE = "closure"  # the closure notice of a session (S9)
    BOT = "bot"  # bot-initiated (POST /admin/messages)


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    SKIPPED = "skipped"
    DEAD = "dead"


@dataclass(slots=True, eq=False)
class Session:
    """One conversation session. ``expires_at`` is None when it never expires (S3).

    Compared by identity: two objects are the same session only if they are the same object
    (value equality over every field would make batch work quadratic, and mean nothing).
    """

    id: str
    endpoint: str
    channel: str
    conversation: str
    started_at: float
    last_activity_at: float
    expires_at: float | None
    state: SessionState = SessionState.OPEN
    interactive: bool = True
    developer: bool = False
    closed_at: float | None = None
    close_reason: CloseReason | None = None
    notice: str | None = None
    message_count: int = 0
    intent: str | None = None
    # None until the flow sets something: an open session must stay small in memory.
    variables: JSONDict | None = None
    context: JSONDict | None = None

    @property
    def contact_id(self) -> str:
        return contact_id_of(self.endpoint, self.conversation)

    @property
    def billable(self) -> bool:
        """Only interactive, non-developer sessions are billable (S15)."""
        return self.interactive and not self.developer

    @property
    def is_open(self) -> bool:
        return self.state is SessionState.OPEN


def contact_id_of(endpoint: str, conversation: str) -> str:
    """The contact id of a conversation: ``<endpoint>:<conversation>`` (DESIGN.md)."""
    return f"{endpoint}:{conversation}"


@dataclass(slots=True)
class Contact:
    """The person (or group) behind a conversation; holds the session history (S6)."""

    id: str
    endpoint: str
    conversation: str
    created_at: float
    display_name: str | None = None
    opted_out: bool = False
    last_user_message_at: float | None = None
    # Variables with their own TTL outlive sessions (S19): name -> {"value", "expires_at"}.
    variables: JSONDict = field(default_factory=dict)
    # Auth profiles (S11): name -> tokens. They outlive a session (the user stays authorised)
    # unless the endpoint's on_close.clear_auth_profiles clears them at close.
    auth_profiles: JSONDict = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class InboundEvent:
    """A channel-neutral event parsed from a platform request or a web chat frame.

    ``dedup_key`` is the platform's unique id of the delivery (mid, webhookEventId, event_id,
    MessageSid); a second event with the same key on the same endpoint is a redelivery.
    """

    conversation: str
    kind: EventKind
    dedup_key: str
    message_id: str | None = None
    text: str | None = None
    attachments: tuple[JSONDict, ...] = ()
    timestamp: float | None = None  # the platform's own time of the event
    reply_token: str | None = None  # LINE reply token
    reply_token_expires_at: float | None = None
    sender_name: str | None = None

    @property
    def is_interaction(self) -> bool:
        """User messages and postbacks open and extend sessions (S16)."""
        return self.kind in (EventKind.MESSAGE, EventKind.POSTBACK)


@dataclass(slots=True)
class StoredEvent:
    """An inbound event as committed to the durable inbox, before the webhook's 2xx.

    With several instances (Redis) ``seq`` numbers the conversation's events in acceptance
    order (0 where the store does not number them) and ``owner`` names the instance that
    handles the conversation when that is another one (None: this instance).
    ``contact_known``: the store also read the conversation's contact as of that commit
    (``contact``, None when there is none), so the message turn need not read it again; the
    session manager keeps it only when nothing can change the contact before the turn.
    """

    id: int
    endpoint: str
    arrival_at: float
    event: InboundEvent
    seq: int = 0
    owner: str | None = None
    # Not part of the event: left out of comparisons and repr.
    contact: Contact | None = field(default=None, compare=False, repr=False)
    contact_known: bool = field(default=False, compare=False, repr=False)


@dataclass(slots=True)
class OutboundMessage:
    """A message waiting in (or gone through) the durable outbox.

    ``key`` makes the enqueue idempotent (``close:<session_id>``, ``reply:<event_id>:<n>``);
    ``id`` is assigned by the store. ``parts_sent`` counts the parts of a split text (platform
    requests, see ``channels.base.ChannelAdapter.send``) that the platform already accepted:
    later attempts, also after a restart, resume after them.
    """

    endpoint: str
    channel: str
    conversation: str
    kind: MessageKind
    text: str
    key: str
    created_at: float
    session_id: str | None = None
    reply_token: str | None = None
    reply_token_expires_at: float | None = None
    user_last_seen_at: float | None = None  # for the Messenger 24 h window
    id: int = 0
    state: OutboxState = OutboxState.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    sent_at: float | None = None
    parts_sent: int = 0


@dataclass(slots=True, frozen=True)
class TranscriptLine:
    """One line of a conversation as its user saw it: a user message, or a message sent to them.

    ``sender`` is ``user`` or ``bot``; ``kind`` is the event kind of a user line (``message``,
    ``postback``) and the ``MessageKind`` of a bot line; ``message_id`` is the platform's (or
    the web chat client's) id of a user message.
    """

    at: float
    sender: str
    kind: str
    text: str
    message_id: str | None = None


@dataclass(slots=True)
class Change:
    """One atomic unit of work for the store: everything in it commits together or not at all.

    A session's close and its closure notice travel in one Change, so neither exists without
    the other (DESIGN.md, non-negotiables).
    """

    sessions: list[Session] = field(default_factory=list)
    # Sessions just closed with nothing else changed since their last commit: only the closing
    # columns are written (mass expiry commits 100k of these a second).
    closes: list[Session] = field(default_factory=list)
    contacts: list[Contact] = field(default_factory=list)
    outbox: list[OutboundMessage] = field(default_factory=list)  # inserted; duplicate keys ignored
    handled_events: list[int] = field(default_factory=list)  # inbox ids now done
    outbox_updates: list[OutboundMessage] = field(default_factory=list)  # state/attempts changed
    notices: list[tuple[str, str]] = field(default_factory=list)  # (session_id, notice)
    # Filled by a store shared by several instances (Redis): closes in ``closes`` it refused
    # (the close claim failed), session id -> the stored deadline that moved past now, or None
    # when the session is closed already or no longer this instance's. Their closure notices
    # were not queued. A single-process store never refuses (memory is the truth there).
    refused_closes: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class TranscriptEntry:
    """One line of a conversation's transcript (``GET /admin/contacts/<id>``): a user's message
    (from the inbox, kept ``retention.dedup_days``) or a message sent to the user (from the
    outbox, kept ``retention.messages_days``)."""

    at: float  # arrival (user) or creation (bot) time
    sender: str  # "user" | "bot"
    kind: str  # user: message | postback; bot: reply | closure | bot
    text: str | None
    session_id: str | None = None  # bot messages know it; a user message's is found by time
    state: str | None = None  # bot messages: pending | sent | skipped | dead
    attachments: tuple[str, ...] = ()  # types of a user's non-text content (image, file, ...)
