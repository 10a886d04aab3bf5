"""Slack Events API payloads, read tolerantly: pure predicates (S16 housekeeping), the
conversation ids, and the conversion of one signed body to a ``ParsedWebhook``.
``channels.slack`` verifies the signature and calls ``read_payload`` with the body.

Conversation ids (DESIGN.md): ``<channel>`` for a top-level message, ``<channel>:<thread_ts>``
for a reply inside a thread (a thread is its own conversation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson

from channels.base import ParsedWebhook, WebhookResponse, number_or_none, platform_time
from gateway.errors import BadPayload
from gateway.models import EventKind, InboundEvent, JSONDict

# Message subtypes that are still a user writing: a file upload with its comment, and a thread
# reply also sent to the channel. Every other subtype (edits, deletions, joins, bot_message,
# ...) is housekeeping (S16).
USER_MESSAGE_SUBTYPES = frozenset({"file_share", "thread_broadcast"})
USER_EVENT_TYPES = frozenset({"message", "app_mention"})


# -- pure predicates on one ``event_callback`` event (S16 housekeeping) ------------------------


def is_user_message(event: Mapping[str, Any], bot_user_id: str | None) -> bool:
    """A message a person wrote in a channel, DM or thread (text or files), or a mention of
    our app (``app_mention``: an app subscribed only to mentions gets nothing else; one
    subscribed to both gets a ``message`` too, with another event_id but the same channel and
    ``ts``, which is why the dedup key is channel and ``ts``).

    Not: other event types, messages of any bot (``bot_id``), our own user's messages, and
    subtypes other than ``USER_MESSAGE_SUBTYPES``.
    """
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in USER_EVENT_TYPES or event.get("bot_id"):
        return False
    subtype = event.get("subtype")
    # (a list is unhashable: look it up only as a string)
    if subtype is not None and (not isinstance(subtype, str) or subtype not in USER_MESSAGE_SUBTYPES):
        return False
    user = event.get("user")
    if not isinstance(user, str) or not user or (bot_user_id and user == bot_user_id):
        return False
    channel = event.get("channel")
    return isinstance(channel, str) and bool(channel)


def conversation_of(event: Mapping[str, Any]) -> str:
    """``<channel>:<thread_ts>`` for a reply inside a thread, else ``<channel>``.

    A thread's parent carries ``thread_ts == ts`` once it has replies: it is still top-level.
    """
    channel = str(event.get("channel") or "")
    thread_ts = event.get("thread_ts")
    if isinstance(thread_ts, str) and thread_ts and thread_ts != event.get("ts"):
        return f"{channel}:{thread_ts}"
    return channel


def split_conversation(conversation: str) -> tuple[str, str | None]:
    """The channel and thread_ts (None for the channel itself) of a conversation id."""
    channel, _, thread_ts = conversation.partition(":")
    return channel, thread_ts or None


# -- one signed body --------------------------------------------------------------------------


def read_payload(body: bytes, bot_user_id: str | None) -> ParsedWebhook:
    """The challenge of a ``url_verification``, or the one user message of an
    ``event_callback`` (anything else is ignored). Raises ``BadPayload`` for a body that is not
    such a payload. The signature must have been verified already."""
    try:
        payload = _loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadPayload("body is not JSON") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
        raise BadPayload('expected an object with a "type"')
    kind = payload["type"]
    if kind == "url_verification":
        challenge = payload.get("challenge")
        if not isinstance(challenge, str):
            raise BadPayload("url_verification without a challenge")
        return ParsedWebhook(response=WebhookResponse(200, text=challenge))
    if kind != "event_callback":
        return ParsedWebhook(ignored=1)  # app_rate_limited and future payload types
    event = payload.get("event")
    if not isinstance(event, dict):
        raise BadPayload('event_callback without an "event" object')
    if not is_user_message(event, bot_user_id):
        return ParsedWebhook(ignored=1)
    event_id = payload.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise BadPayload("event_callback without an event_id")
    return ParsedWebhook(events=[_event_of(event_id, event)])


# -- helpers ----------------------------------------------------------------------------------


def _loads(body: bytes) -> Any:
    """The JSON of a signed body. orjson first (the hot path); what it refuses that is still
    JSON to the standard library (a number beyond a double, 1e400) is read as before."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _seconds(value: Any) -> float | None:
    """Slack's ``"1355517523.000005"`` (or a number) in seconds; None when it is not one."""
    return number_or_none(value) if isinstance(value, str | int | float) else None


def _event_of(event_id: str, event: Mapping[str, Any]) -> InboundEvent:
    """The MESSAGE event of a user message (``is_user_message`` holds)."""
    ts = event.get("ts")
    message_id = ts if isinstance(ts, str) and ts else None
    text = event.get("text")
    files = event.get("files")
    attachments: tuple[JSONDict, ...] = ()
    if isinstance(files, list):
        attachments = tuple(
            {"type": "file", "name": file.get("name"), "mimetype": file.get("mimetype")}
            for file in files
            if isinstance(file, dict)
        )
    channel = event.get("channel")
    return InboundEvent(
        conversation=conversation_of(event),
        kind=EventKind.MESSAGE,
        # The message and the app_mention of one mention (and every retry of either) share
        # channel and ts; event_id differs between the first two (CHANNELS.md).
        dedup_key=f"{channel}:{message_id}" if message_id else event_id,
        message_id=message_id,
        text=text if isinstance(text, str) and text else None,
        attachments=attachments,
        timestamp=platform_time(_seconds(event.get("event_ts")) or _seconds(ts)),
    )
