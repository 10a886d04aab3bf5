"""Model <-> Redis hash conversion for the Redis store.

A model becomes a list of ``field, value`` strings to set and a list of fields to delete (a None
value is an absent field). Floats travel as ``repr`` (it round-trips exactly; NaN and infinity
are refused, as the SQLite store refuses them), booleans as ``1``/``0``, dicts as JSON.
Inbound event payloads use the SQLite store's JSON form (``sqlite_rows.event_to_json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from gateway.models import (
    CloseReason,
    Contact,
    MessageKind,
    OutboundMessage,
    OutboxState,
    Session,
    SessionState,
)

Fields = tuple[list[str], list[str]]  # (field, value, field, value ...), (deleted fields)

SESSION_FIELDS = tuple(f.name for f in dataclasses.fields(Session))
OUTBOX_FIELDS = tuple(f.name for f in dataclasses.fields(OutboundMessage) if f.name != "id")
# The columns a delivery attempt changes (as sqlite_rows.OUTBOX_UPDATE_COLUMNS).
OUTBOX_UPDATE_FIELDS = ("state", "attempts", "next_attempt_at", "last_error", "sent_at")
CLOSE_FIELDS = ("state", "closed_at", "close_reason", "notice", "expires_at")


def number(value: float) -> str:
    """A float as exact text; ValueError for NaN and infinities (no JSON, no SQL form either)."""
    if not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return repr(float(value))


def encode(value: Any) -> str | None:
    """One field's text, or None when the field is absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return number(value)
    if isinstance(value, int | str):
        return str(value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    raise TypeError(f"cannot store a {type(value).__name__}")


def fields_of(obj: Any, names: tuple[str, ...]) -> Fields:
    """``names`` of ``obj`` as (set, delete) lists."""
    setting: list[str] = []
    deleting: list[str] = []
    for name in names:
        text = encode(getattr(obj, name))
        if text is None:
            deleting.append(name)
        else:
            setting += [name, text]
    return setting, deleting


def _float(raw: Mapping[str, str], name: str) -> float | None:
    value = raw.get(name)
    return None if value is None else float(value)


def _json(raw: Mapping[str, str], name: str) -> dict[str, Any] | None:
    value = raw.get(name)
    return None if value is None else dict(json.loads(value))


def session_from(raw: Mapping[str, str]) -> Session:
    """A session from its hash (endpoint and channel interned, as the SQLite store does)."""
    reason = raw.get("close_reason")
    return Session(
        id=raw["id"],
        endpoint=sys.intern(raw["endpoint"]),
        channel=sys.intern(raw["channel"]),
        conversation=raw["conversation"],
        started_at=float(raw["started_at"]),
        last_activity_at=float(raw["last_activity_at"]),
        expires_at=_float(raw, "expires_at"),
        state=SessionState(raw["state"]),
        interactive=raw["interactive"] == "1",
        developer=raw["developer"] == "1",
        closed_at=_float(raw, "closed_at"),
        close_reason=None if reason is None else CloseReason(reason),
        notice=raw.get("notice"),
        message_count=int(raw["message_count"]),
        intent=raw.get("intent"),
        variables=_json(raw, "variables"),
        context=_json(raw, "context"),
    )


def outbound_from(raw: Mapping[str, str]) -> OutboundMessage:
    """An outbox message from its hash."""
    return OutboundMessage(
        id=int(raw["id"]),
        endpoint=raw["endpoint"],
        channel=raw["channel"],
        conversation=raw["conversation"],
        kind=MessageKind(raw["kind"]),
        text=raw["text"],
        key=raw["key"],
        created_at=float(raw["created_at"]),
        session_id=raw.get("session_id"),
        reply_token=raw.get("reply_token"),
        reply_token_expires_at=_float(raw, "reply_token_expires_at"),
        user_last_seen_at=_float(raw, "user_last_seen_at"),
        state=OutboxState(raw["state"]),
        attempts=int(raw["attempts"]),
        next_attempt_at=float(raw["next_attempt_at"]),
        last_error=raw.get("last_error"),
        sent_at=_float(raw, "sent_at"),
        parts_sent=int(raw.get("parts_sent", "0")),
    )


def contact_to_json(contact: Contact) -> str:
    """A contact as one JSON document; ValueError/TypeError when it has no JSON form."""
    return json.dumps(dataclasses.asdict(contact), separators=(",", ":"), allow_nan=False)


def contact_from_json(text: str) -> Contact:
    return Contact(**json.loads(text))
