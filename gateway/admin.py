"""The operator API under ``/admin`` (bearer token; JSON in and out; DESIGN.md shapes).

Handlers raise ``gateway.errors``; ``gateway.http_errors`` answers them (one error shape).
The management page (``/admin/ui``) is the one admin route without the bearer: it asks for the
token itself (it is still 404 when admin is off). Every route is in ``gateway.admin_openapi``.

``GET /admin/contacts/<id>`` adds ``transcript`` to the contract's shape: the messages of the
contact's newest ``TRANSCRIPT_SESSIONS`` conversations, oldest first, at most
``TRANSCRIPT_LIMIT`` (the newest), as retention keeps them (users' texts ``dedup_days``, sent
texts ``messages_days``). ``DELETE`` erases the contact (204).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import BadPayload, NotFound, SessionNotFound, Unauthorized
from gateway.http_errors import ADMIN_PREFIX
from gateway.keys import CLOCK, MANAGER, OUTBOX, SETTINGS, STORE
from gateway.logs import log_context
from gateway.models import Session, SessionState, TranscriptEntry
from gateway.store.base import SessionQuery
from gateway.wire import contact_json, iso, session_json

log = logging.getLogger("gateway.admin")

UI_PATH = "/admin/ui"  # the page asks for the token itself
TRANSCRIPT_SESSIONS = 10
TRANSCRIPT_LIMIT = 500


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/admin/* is 404 without a configured token, 401 without the right bearer."""
    if request.path.startswith(ADMIN_PREFIX):
        token = request.app[SETTINGS].admin.token.value
        if not token:
            raise web.HTTPNotFound()
        if request.path == UI_PATH:
            return await handler(request)
        # Header bytes that are not UTF-8 arrive as surrogate escapes: compare them as bytes.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            raise Unauthorized("missing or wrong bearer token")
    response: web.StreamResponse = await handler(request)
    return response


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when there is none); ``BadPayload`` (400) otherwise."""
    if not request.body_exists:  # (read already by gateway.serving.read_in_time: can_read_body is False)
        return {}
    try:
        body = await request.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise BadPayload("body is not JSON") from exc
    if not isinstance(body, dict):
        raise BadPayload("body must be a JSON object")
    return body


async def list_sessions(request: web.Request) -> web.StreamResponse:
    state_text = request.query.get("state")
    try:
        state = SessionState(state_text) if state_text else None
        limit = int(request.query.get("limit", "100"))
    except ValueError as exc:
        raise BadPayload("state must be open or closed; limit a number") from exc
    query = SessionQuery(
        state=state,
        endpoint=request.query.get("endpoint"),
        cursor=request.query.get("cursor"),
        limit=max(1, min(limit, 1000)),
    )
    try:
        sessions, cursor = await request.app[STORE].list_sessions(query)
    except ValueError as exc:
        raise BadPayload("cursor is not one this gateway gave out") from exc
    manager = request.app[MANAGER]
    return web.json_response({"sessions": [session_json(manager.live_view(s)) for s in sessions], "next": cursor})


async def get_session(request: web.Request) -> web.StreamResponse:
    session = await request.app[STORE].get_session(request.match_info["id"])
    if session is None:
        raise SessionNotFound(request.match_info["id"])
    return web.json_response(session_json(request.app[MANAGER].live_view(session)))


async def close_session(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    notify = body.get("notify", True)
    if not isinstance(notify, bool):
        raise BadPayload("notify must be true or false")
    # SessionNotFound (404) and SessionNotOpen (409) are answered by the error middleware.
    session = await request.app[MANAGER].close(request.match_info["id"], notify=notify)
    return web.json_response(session_json(session))


async def get_contact(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    contact_id = request.match_info["contact_id"]
    contact = await store.get_contact(contact_id)
    if contact is None:
        raise NotFound("no such contact")
    manager = request.app[MANAGER]
    sessions = [manager.live_view(s) for s in await store.contact_sessions(contact_id)]
    shown = sessions[:TRANSCRIPT_SESSIONS]
    entries: list[TranscriptEntry] = []
    if shown:
        since, until = shown[-1].started_at, request.app[CLOCK]() + 1.0
        entries = await store.transcript(contact.endpoint, contact.conversation, since, until, TRANSCRIPT_LIMIT)
    return web.json_response(
        {
            "contact": contact_json(contact),
            "conversations": [session_json(s) for s in sessions],
            "transcript": [_entry_json(entry, shown) for entry in entries],
        }
    )


def _entry_json(entry: TranscriptEntry, sessions: list[Session]) -> dict[str, Any]:
    """A transcript line; a user message belongs to the newest session started by then."""
    session_id = entry.session_id
    if session_id is None:
        session_id = next((s.id for s in sessions if s.started_at <= entry.at), None)
    body: dict[str, Any] = {
        "at": iso(entry.at),
        "from": entry.sender,
        "kind": entry.kind,
        "text": entry.text,
        "session_id": session_id,
    }
    if entry.state is not None:
        body["state"] = entry.state
    if entry.attachments:
        body["attachments"] = list(entry.attachments)
    return body


async def delete_contact(request: web.Request) -> web.StreamResponse:
    """Erase a contact with its sessions, variables, profiles and messages (204); its open
    session is closed silently first. 404 when nothing is known of it."""
    contact_id = request.match_info["contact_id"]
    endpoint, _, conversation = contact_id.partition(":")
    store = request.app[STORE]
    if await store.get_contact(contact_id) is None and not await store.contact_sessions(contact_id):
        raise NotFound("no such contact")
    deleted = await request.app[MANAGER].erase_contact(endpoint, conversation)
    request.app[OUTBOX].forget(endpoint, conversation)
    log.info("contact %s erased (%d rows)", contact_id, deleted, extra=log_context(endpoint, conversation))
    return web.Response(status=204)


def _required_text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadPayload('"endpoint", "conversation" and "text" are required strings')
    return value


async def post_message(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    endpoint, conversation, text = (_required_text(body, key) for key in ("endpoint", "conversation", "text"))
    if request.app[SETTINGS].endpoint(endpoint) is None:
        raise NotFound("no such endpoint")
    session = await request.app[MANAGER].send_bot_message(endpoint, conversation, text)
    return web.json_response({"session": session_json(session)}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_get("/admin/sessions/{id}", get_session)
    app.router.add_post("/admin/sessions/{id}/close", close_session)
    app.router.add_get("/admin/contacts/{contact_id}", get_contact)
    app.router.add_delete("/admin/contacts/{contact_id}", delete_contact)
    app.router.add_post("/admin/messages", post_message)
