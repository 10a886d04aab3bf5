"""The channel adapter interface and its value types.

An adapter turns a platform's webhook request into channel-neutral ``InboundEvent``s (verifying
the signature first) and sends a text to a conversation. It knows nothing of sessions: the
conversation id it produces is also the address it sends to.

A long text goes out in parts, one platform request each; the outbox stores how many the
platform accepted (``OutboundMessage.parts_sent``), and ``send_parts`` resumes after them, so a
part is not sent again by a retry or after a restart.

Conversation ids (DESIGN.md): messenger the PSID; line the userId, groupId or roomId; slack
``<channel>`` or ``<channel>:<thread_ts>``; twilio the user's E.164 number; webchat the id the
server issued in its hello.

What a platform needs and how it is served is its ``ChannelSpec`` (``channels.registry``). This
module imports nothing heavy at run time (aiohttp only for type checking), so configuration
checks can read the specs without the web stack or the platform SDKs.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from gateway.models import InboundEvent, OutboundMessage, Session, TranscriptLine

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

# Platform times outside this window are not real (NaN, 1e17, year 10000): they are dropped,
# so that no later conversion (ISO 8601 for the flow) fails on an accepted event.
_EARLIEST_S = 946_684_800.0  # 2000-01-01
_LATEST_S = 4_102_444_800.0  # 2100-01-01

Part = TypeVar("Part")

# ``await progress(done, total)``: the platform accepted parts 1..``done`` of ``total``.
Progress = Callable[[int, int], Awaitable[None]]


def platform_time(seconds: float | None) -> float | None:
    """A platform's event time in POSIX seconds if it is plausible, else None."""
    if seconds is None or not math.isfinite(seconds) or not _EARLIEST_S <= seconds <= _LATEST_S:
        return None
    return seconds


def number_or_none(value: object) -> float | None:
    """A platform's number (an int, a float or a numeric string) as a float, None when it is
    none of these. Never raises: an int too big for a float (``10**400``, valid JSON) becomes
    ``inf``, which ``platform_time`` then drops."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    return None


MAX_CARRIED_DEPTH = 16  # nesting kept of platform JSON carried on an event (real payloads: a few)


def shallow(value: Any, depth: int = MAX_CARRIED_DEPTH) -> Any:
    """A copy of platform JSON to carry on an event (attachments, postback payloads), with
    nesting deeper than ``depth`` cut off: JSON that parsed could otherwise fail to serialise
    again later (inbox row, flow call) when it is done deeper in the call stack."""
    if isinstance(value, dict):
        return {key: shallow(item, depth - 1) for key, item in value.items()} if depth > 0 else None
    if isinstance(value, list):
        return [shallow(item, depth - 1) for item in value] if depth > 0 else None
    return value


def whole_conversation(conversation: str) -> str:
    """The default rate-limit scope: every conversation is its own."""
    return conversation


@dataclass(slots=True, frozen=True)
class Limits:
    """Sends per second to a platform (None: unlimited): a channel's defaults, or one endpoint's
    limits in force (``gateway.ratelimit``)."""

    per_second: float | None = None  # the whole endpoint
    per_conversation_per_second: float | None = None
    # Which conversations share one per-conversation bucket (the platform's unit of the limit).
    scope: Callable[[str], str] = field(default=whole_conversation, compare=False)

    @property
    def unlimited(self) -> bool:
        return self.per_second is None and self.per_conversation_per_second is None


@dataclass(slots=True, frozen=True)
class ChannelSpec:
    """What one platform needs and how the gateway serves it; plain data, read without
    importing the adapter.

    ``adapter`` is ``"module:Class"``, imported when an endpoint of the channel is created.
    ``hosted_path`` set means the adapter serves its own routes there (``{name}`` is the
    endpoint's name) and is a ``HostedChannel``; unset, it is a ``WebhookChannel`` at the
    endpoint's ``path``. ``holds_undelivered``: a message nobody can receive now stays pending
    until the user connects (``DeliveryDeferred``), and the store's retention prunes it.
    """

    adapter: str
    credentials: tuple[str, ...] = ()  # required, non-empty
    optional_credentials: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    hosted_path: str | None = None
    holds_undelivered: bool = False
    # credential -> (regular expression its whole value must match, what it must be), checked
    # with the configuration (check-config and serve): a value the platform can never accept.
    credential_formats: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class WebhookRequest:
    """A platform's HTTP request, as the web layer received it.

    ``public_url`` is the URL the platform called (``server.public_url`` + path + query, or
    rebuilt from Host, or from X-Forwarded-* of a trusted proxy; "" for a malformed host; see
    ``gateway.proxies``): Twilio signs it.
    """

    method: str
    path: str
    query: Mapping[str, str]
    public_url: str
    headers: Mapping[str, str]  # case-insensitive (a CIMultiDictProxy)
    body: bytes
    content_type: str = ""
    # Parsed form fields (a MultiDict). The web layer leaves it None: it parses no body, the
    # Twilio adapter reads its form itself after the signature header (DESIGN.md "Hostile input").
    form: Mapping[str, str] | None = None


@dataclass(slots=True, frozen=True)
class WebhookResponse:
    """What the platform gets back immediately (after the events are durably recorded)."""

    status: int = 200
    text: str = ""
    content_type: str = "text/plain"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ParsedWebhook:
    """The outcome of one verified webhook request."""

    events: list[InboundEvent] = field(default_factory=list)
    ignored: int = 0  # housekeeping events counted and dropped (echoes, receipts, ...)
    response: WebhookResponse = field(default_factory=WebhookResponse)


class ChannelAdapter(Protocol):
    """Sends to one endpoint's platform. One instance per endpoint, created at start."""

    channel: str

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Create platform clients inside the running loop (Slack may call auth.test here)."""

    async def aclose(self) -> None:
        """Close platform clients. Safe to call twice."""

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """Deliver ``message.text`` to ``message.conversation``, in parts, through ``send_parts``.

        A part is one platform request: the text cut at the platform's limit, or for LINE up
        to five such texts in one request. Parts before ``message.parts_sent`` are not sent
        again; after each part the platform accepts, ``await progress(done, total)`` (the
        outbox records ``done`` before the next part goes out; it stores nothing else here).

        Raises ``DeliveryError`` (``retryable``, ``retry_after_s``) on failure,
        ``DeliverySkipped`` when platform policy forbids the send, ``DeliveryDeferred`` when
        nobody can receive it now (web chat).
        """


async def send_parts(
    message: OutboundMessage,
    parts: Sequence[Part],
    post: Callable[[int, Part], Awaitable[None]],
    progress: Progress | None,
) -> None:
    """The one rule for split messages: ``await post(index, part)`` for each part from
    ``message.parts_sent`` on, in order, one at a time, and ``await progress(index + 1, total)``
    after each that returned. Parts an earlier attempt delivered are skipped; when that is all
    of them, nothing is sent. ``post`` raises to stop (the message is retried from there)."""
    for index in range(message.parts_sent, len(parts)):
        await post(index, parts[index])
        if progress is not None:
            await progress(index + 1, len(parts))


@runtime_checkable
class WebhookChannel(ChannelAdapter, Protocol):
    """A platform that calls ``/webhooks/<endpoint>``."""

    def handshake(self, request: WebhookRequest) -> WebhookResponse:
        """Answer a GET on the webhook path (Messenger verification). Raises ``Forbidden``
        on a wrong token and ``BadPayload`` when the channel has no GET handshake."""

    def parse_webhook(self, request: WebhookRequest) -> ParsedWebhook:
        """Verify the signature over the raw body, then parse every event of the batch.

        Raises ``BadSignature`` (missing/wrong/stale) before looking at the body, and
        ``BadPayload`` for a body that cannot be the platform's payload. Never anything else
        for bad input.
        """


class Inbox(Protocol):
    """The core as a ``HostedChannel`` sees it: one endpoint's sessions, outbox and the
    conversations the gateway issued."""

    def open_session_id(self, conversation: str) -> str | None:
        """The id of the conversation's open session, None when none is open."""

    async def last_session(self, conversation: str) -> Session | None:
        """The conversation's open session, else its most recent closed one, else None."""

    async def transcript(self, conversation: str, since: float, limit: int) -> list[TranscriptLine]:
        """The conversation's lines from ``since`` on, as its user saw them (``Store.history``)."""

    def client_address(self, request: web.Request) -> str:
        """The client's address: the socket's peer, or behind a trusted proxy
        (``server.trusted_proxies``) the nearest untrusted hop of ``X-Forwarded-For``."""

    async def accept(self, event: InboundEvent) -> None:
        """Commit ``event`` of this endpoint; returns once it is durable (a redelivery of a
        ``dedup_key`` seen before too). Raises ``Overloaded`` when it is not accepted."""

    def wake(self, conversation: str, ready: Callable[[], None]) -> None:
        """The conversation can receive again: its kept messages are read from the store and
        queued in order, then ``ready()`` is called; from then on it gets every later message."""

    async def add_conversation(self, conversation: str, secret_hash: str) -> None:
        """Record a conversation the gateway issued, with the hash of its secret, durably."""

    async def conversation_secret(self, conversation: str) -> str | None:
        """The secret hash of an issued conversation; None for an id never issued."""


@runtime_checkable
class HostedChannel(ChannelAdapter, Protocol):
    """A channel the gateway hosts itself (web chat): it serves its own routes, and its
    ``aclose`` also runs at shutdown, before cleanup, so that client connections end first."""

    def add_routes(self, router: web.UrlDispatcher, path: str, inbox: Inbox) -> None:
        """Add this endpoint's routes under ``path`` (its spec's ``hosted_path``)."""


@runtime_checkable
class SessionListener(Protocol):
    """An adapter that hears of every change of its conversations' sessions (opened, closed)."""

    def session_changed(self, conversation: str, state: str, session_id: str) -> None:
        """Called in the loop, synchronously: it must not block (schedule any I/O)."""
