"""Admin API: dead letters (bearer token via ``admin.admin_auth``; JSON in and out).

- ``GET /admin/dead-letters?limit=N`` -> ``{"dead_letters": [message...]}``, newest first
  (default 100, at most 1000).
- ``POST /admin/dead-letters/<id>/retry`` -> 202 with the message, now pending and queued at
  the end of its conversation; 404 for an unknown id, 409 when it is not a dead letter.
- ``DELETE /admin/dead-letters/<id>`` -> 204, the dead letter is gone; 404 unknown, 409 not dead.

``next_attempt_at`` is when a pending message is tried next; null for a dead letter (it is
tried again only when retried) and for messages sent or skipped.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import BadPayload, MessageNotFound
from gateway.keys import OUTBOX, STORE
from gateway.models import JSONDict, OutboundMessage, OutboxState
from gateway.wire import iso

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def outbound_json(message: OutboundMessage) -> JSONDict:
    """An outbox message as the admin API shows it (``last_error``: why it died)."""
    return {
        "id": message.id,
        "endpoint": message.endpoint,
        "channel": message.channel,
        "conversation": message.conversation,
        "kind": message.kind.value,
        "text": message.text,
        "key": message.key,
        "session_id": message.session_id,
        "state": message.state.value,
        "attempts": message.attempts,
        "last_error": message.last_error,
        "created_at": iso(message.created_at),
        "next_attempt_at": iso(message.next_attempt_at)
        if message.state is OutboxState.PENDING and message.next_attempt_at > 0
        else None,
    }


async def list_dead_letters(request: web.Request) -> web.StreamResponse:
    try:
        limit = int(request.query.get("limit", str(DEFAULT_LIMIT)))
    except ValueError as exc:
        raise BadPayload("limit must be a number") from exc
    messages = await request.app[STORE].dead_letters(max(1, min(limit, MAX_LIMIT)))
    return web.json_response({"dead_letters": [outbound_json(m) for m in messages]})


def _message_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and 0 < int(text) < 2**63):  # a row id
        raise MessageNotFound(f"{text!r} is not a message id")
    return int(text)


async def retry_dead_letter(request: web.Request) -> web.StreamResponse:
    message = await request.app[OUTBOX].retry(_message_id(request))  # MessageNotFound 404, MessageNotDead 409
    return web.json_response(outbound_json(message), status=202)


async def delete_dead_letter(request: web.Request) -> web.StreamResponse:
    await request.app[OUTBOX].delete(_message_id(request))  # MessageNotFound 404, MessageNotDead 409
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Register the dead-letter routes."""
    app.router.add_get("/admin/dead-letters", list_dead_letters)
    app.router.add_post("/admin/dead-letters/{id}/retry", retry_dead_letter)
    app.router.add_delete("/admin/dead-letters/{id}", delete_dead_letter)
