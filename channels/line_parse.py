"""LINE webhook events, read tolerantly: pure predicates (S16 housekeeping) and the conversion
of one ``events[]`` item to a channel-neutral ``InboundEvent``. ``channels.line`` verifies the
signature and calls ``to_inbound`` for each event of a batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from channels.base import number_or_none, platform_time, shallow
from gateway.models import EventKind, InboundEvent, JSONDict

# A reply token lives about one minute from the webhook; keep a margin for queueing and transit.
REPLY_TOKEN_TTL_S = 50.0


# -- pure predicates and conversions on one ``events[]`` item (S16 housekeeping) --------------


def is_standby(event: Mapping[str, Any]) -> bool:
    """Another channel owns this chat (module mode): we must not answer."""
    return event.get("mode") == "standby"


def is_user_message(event: Mapping[str, Any]) -> bool:
    """A message the user sent (text, sticker, image, ...), not in standby mode."""
    return event.get("type") == "message" and isinstance(event.get("message"), Mapping) and not is_standby(event)


def is_postback(event: Mapping[str, Any]) -> bool:
    """A tap on a postback action, an interaction like a message."""
    return event.get("type") == "postback" and isinstance(event.get("postback"), Mapping) and not is_standby(event)


def is_interaction(event: Mapping[str, Any]) -> bool:
    """User messages and postbacks open and extend sessions; follow, join, read, standby, unsend
    and everything else are housekeeping (S16)."""
    return is_user_message(event) or is_postback(event)


def conversation_of(source: Any) -> str | None:
    """The conversation id of an event source: its group, its room, else its user."""
    if not isinstance(source, Mapping):
        return None
    key = {"group": "groupId", "room": "roomId"}.get(str(source.get("type")), "userId")
    value = source.get(key)
    return value if isinstance(value, str) and value else None


def dedup_key_of(event: Mapping[str, Any]) -> str:
    """``webhookEventId``; else the message id; else a hash of the event itself (stable across
    redeliveries, which change only ``deliveryContext``)."""
    event_id = event.get("webhookEventId")
    if isinstance(event_id, str) and event_id:
        return event_id
    message = event.get("message")
    if isinstance(message, Mapping) and message.get("id") not in (None, ""):
        return f"{message['id']}"
    stable = {k: shallow(v) for k, v in event.items() if k != "deliveryContext"}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def attachment_of(message: Mapping[str, Any]) -> JSONDict:
    """A non-text message as an attachment: every field LINE gave, except one-use tokens."""
    attachment: JSONDict = {"type": message.get("type")}
    attachment.update({k: shallow(v) for k, v in message.items() if k != "type" and not k.endswith("Token")})
    return attachment


def to_inbound(event: Mapping[str, Any], now: float) -> InboundEvent | None:
    """The channel-neutral event for one LINE event, or None for housekeeping (``now`` is the
    wall clock at arrival, for the reply token's expiry)."""
    if not is_interaction(event):
        return None
    conversation = conversation_of(event.get("source"))
    if conversation is None:
        return None
    text: str | None
    attachments: tuple[JSONDict, ...]
    message_id: str | None = None
    if is_user_message(event):
        message = event["message"]
        kind = EventKind.MESSAGE
        raw_id = message.get("id")
        message_id = None if raw_id in (None, "") else f"{raw_id}"
        raw_text = message.get("text")
        if message.get("type") == "text" and isinstance(raw_text, str):
            text, attachments = raw_text, ()
        else:
            text, attachments = None, (attachment_of(message),)
    else:
        postback = event["postback"]
        kind = EventKind.POSTBACK
        data = postback.get("data")
        text = data if isinstance(data, str) else None
        attachment: JSONDict = {"type": "postback", "data": text}
        if isinstance(postback.get("params"), Mapping):
            attachment["params"] = shallow(dict(postback["params"]))
        attachments = (attachment,)
    stamp = event.get("timestamp")
    token = event.get("replyToken")
    reply_token = token if isinstance(token, str) and token else None
    return InboundEvent(
        conversation=conversation,
        kind=kind,
        dedup_key=dedup_key_of(event),
        message_id=message_id,
        text=text,
        attachments=attachments,
        timestamp=_seconds(stamp),
        # A redelivered event's token may be stale already: the send falls back to push then.
        reply_token=reply_token,
        reply_token_expires_at=now + REPLY_TOKEN_TTL_S if reply_token else None,
    )


def _seconds(stamp: Any) -> float | None:
    """LINE's millisecond ``timestamp`` in seconds, when it is a plausible number."""
    milliseconds = number_or_none(stamp) if isinstance(stamp, int | float) else None
    return None if milliseconds is None else platform_time(milliseconds / 1000)
