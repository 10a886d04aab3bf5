"""Outbound messages as the outbox hands them to a channel adapter, for the adapters' own tests
(``tests/test_channel_*.py``). One builder, so that a change to ``OutboundMessage``'s fields is
made here once."""

from __future__ import annotations

from typing import Any

from gateway.models import MessageKind, OutboundMessage


def outbound_message(
    endpoint: str,
    channel: str,
    conversation: str,
    text: str,
    *,
    key: str = "reply:1:0",
    kind: MessageKind = MessageKind.REPLY,
    created_at: float = 0.0,
    **fields: Any,
) -> OutboundMessage:
    """A message of ``kind`` (a reply by default) to ``conversation``; ``fields`` are the
    channel-specific ones (``reply_token``, ``user_last_seen_at``, ``attempts`` ...)."""
    return OutboundMessage(
        endpoint=endpoint,
        channel=channel,
        conversation=conversation,
        kind=kind,
        text=text,
        key=key,
        created_at=created_at,
        **fields,
    )
