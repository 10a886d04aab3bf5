"""``GET /admin/openapi.json``: the OpenAPI 3.1 document of every ``/admin`` route.

Written by hand, next to the handlers it describes; ``tests/test_openapi.py`` checks it against
the routes the application registers (a route added without its entry here fails the test) and
runs schemathesis against it. Every error answers the one shape ``Error``. Objects allow keys
beyond those listed: clients must ignore what they do not know.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.keys import SETTINGS
from gateway.metrics import build_version

JSON = dict[str, Any]

_NULLABLE_TIME: JSON = {"type": ["string", "null"], "format": "date-time"}
_TIME: JSON = {"type": "string", "format": "date-time"}


def _ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: JSON, description: str) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": "bad input: a body or query the route cannot take (refused settings list `problems`)",
    "401": "missing or wrong bearer token",
    "404": "no such thing (or route); also every /admin route when admin.token is empty",
    "409": "it exists, but its state forbids the request",
    "413": "body too large",
}


def _answers(ok: dict[str, JSON], *errors: str) -> JSON:
    answers: JSON = dict(ok)
    for status in ("401", "404", *errors):
        answers[status] = {"$ref": f"#/components/responses/E{status}"}
    return answers


def _path_param(name: str, description: str) -> JSON:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


def _query(name: str, schema: JSON, description: str) -> JSON:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_LIMIT = _query(
    "limit",
    {"type": "integer", "default": 100},
    "page size: default 100, clamped to 1..1000; not an integer: 400",
)
_SESSION_ID = _path_param("id", "a session id")
_CONTACT_ID = _path_param("contact_id", "`<endpoint>:<conversation>`")
_MESSAGE_ID = _path_param("id", "an outbox message id (a positive integer)")


def _body(schema: JSON, *, required: bool = True) -> JSON:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


_SCHEMAS: JSON = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "problems": {"type": "array", "items": {"type": "string"}}},
    },
    "Session": {
        "type": "object",
        "required": ["id", "endpoint", "channel", "conversation", "contact_id", "state", "started_at"],
        "properties": {
            "id": {"type": "string"},
            "endpoint": {"type": "string"},
            "channel": {"type": "string"},
            "conversation": {"type": "string"},
            "contact_id": {"type": "string"},
            "state": {"enum": ["open", "closed"]},
            "interactive": {"type": "boolean"},
            "developer": {"type": "boolean"},
            "billable": {"type": "boolean"},
            "started_at": _TIME,
            "last_activity_at": _TIME,
            "expires_at": {**_NULLABLE_TIME, "description": "null: never expires"},
            "closed_at": _NULLABLE_TIME,
            "close_reason": {"enum": ["inactivity", "refresh", "admin", "flow", "endpoint_removed", None]},
            "notice": {"type": ["string", "null"], "description": "queued, sent, none, skipped: ..., failed: ..."},
            "message_count": {"type": "integer"},
            "intent": {"type": ["string", "null"]},
        },
    },
    "SessionPage": {
        "type": "object",
        "required": ["sessions", "next"],
        "properties": {
            "sessions": {"type": "array", "items": _ref("Session")},
            "next": {"type": ["string", "null"], "description": "cursor of the next page; null at the end"},
        },
    },
    "Contact": {
        "type": "object",
        "required": ["id", "endpoint", "conversation", "opted_out"],
        "properties": {
            "id": {"type": "string"},
            "endpoint": {"type": "string"},
            "conversation": {"type": "string"},
            "display_name": {"type": ["string", "null"]},
            "opted_out": {"type": "boolean"},
            "created_at": _NULLABLE_TIME,
            "last_user_message_at": _NULLABLE_TIME,
        },
    },
    "TranscriptEntry": {
        "type": "object",
        "required": ["at", "from", "kind", "text", "session_id"],
        "properties": {
            "at": _TIME,
            "from": {"enum": ["user", "bot"]},
            "kind": {"type": "string", "description": "user: message, postback; bot: reply, closure, bot"},
            "text": {"type": ["string", "null"]},
            "session_id": {"type": ["string", "null"]},
            "state": {"type": "string", "description": "bot messages: pending, sent, skipped, dead"},
            "attachments": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ContactView": {
        "type": "object",
        "required": ["contact", "conversations"],
        "properties": {
            "contact": _ref("Contact"),
            "conversations": {"type": "array", "items": _ref("Session"), "description": "newest first"},
            "transcript": {
                "type": "array",
                "items": _ref("TranscriptEntry"),
                "description": "messages of the newest 10 conversations, oldest first (at most the newest 500), "
                "as retention keeps them",
            },
        },
    },
    "BotMessage": {
        "type": "object",
        "required": ["endpoint", "conversation", "text"],
        "properties": {
            "endpoint": {"type": "string", "minLength": 1},
            "conversation": {"type": "string", "minLength": 1},
            "text": {"type": "string", "minLength": 1},
        },
    },
    "SessionSettings": {
        "type": "object",
        "description": "an endpoint's `session` keys (any subset on PUT; on_close and discard merge key by key)",
        "properties": {
            "expiration_minutes": {"type": ["number", "null"], "minimum": 0},
            "mode": {"enum": ["proactive", "lazy"]},
            "on_close": {"type": "object"},
            "discard": {"type": "object"},
        },
    },
    "EndpointSession": {
        "type": "object",
        "required": ["configured", "effective_expiration_minutes", "override"],
        "properties": {
            "configured": _ref("SessionSettings"),
            "effective_expiration_minutes": {"type": "number", "description": "0: never"},
            "override": {"type": ["object", "null"]},
            "ignored_override": {"type": "object"},
        },
    },
    "OrganisationSettings": {
        "type": "object",
        "properties": {
            "expiration_minutes": {"type": ["number", "null"], "minimum": 0},
            "min_minutes": {"type": "number", "minimum": 0},
            "max_minutes": {"type": "number", "minimum": 0},
        },
    },
    "OrganisationSession": {
        "type": "object",
        "required": ["configured", "override", "endpoints"],
        "properties": {
            "configured": _ref("OrganisationSettings"),
            "override": {"type": ["object", "null"]},
            "endpoints": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {"effective_expiration_minutes": {"type": "number"}},
                },
            },
            "ignored_override": {"type": "object"},
        },
    },
    "Counts": {
        "type": "object",
        "required": ["sessions", "interactive", "non_interactive", "developer", "billable", "closed_by_reason"],
        "properties": {
            "sessions": {"type": "integer"},
            "interactive": {"type": "integer"},
            "non_interactive": {"type": "integer"},
            "developer": {"type": "integer"},
            "billable": {"type": "integer"},
            "closed_by_reason": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "Analytics": {
        "type": "object",
        "required": ["since", "until", "endpoints"],
        "properties": {
            "since": _NULLABLE_TIME,
            "until": _NULLABLE_TIME,
            "endpoints": {"type": "object", "additionalProperties": _ref("Counts")},
        },
    },
    "OutboundMessage": {
        "type": "object",
        "required": ["id", "endpoint", "conversation", "kind", "text", "state", "attempts", "next_attempt_at"],
        "properties": {
            "id": {"type": "integer"},
            "endpoint": {"type": "string"},
            "channel": {"type": "string"},
            "conversation": {"type": "string"},
            "kind": {"enum": ["reply", "closure", "bot"]},
            "text": {"type": "string"},
            "key": {"type": "string"},
            "session_id": {"type": ["string", "null"]},
            "state": {"enum": ["pending", "sent", "skipped", "dead"]},
            "attempts": {"type": "integer"},
            "last_error": {"type": ["string", "null"]},
            "created_at": _NULLABLE_TIME,
            "next_attempt_at": {**_NULLABLE_TIME, "description": "pending only; null for a dead letter"},
        },
    },
    "DeadLetters": {
        "type": "object",
        "required": ["dead_letters"],
        "properties": {"dead_letters": {"type": "array", "items": _ref("OutboundMessage")}},
    },
}


def _paths(endpoint_names: list[str]) -> JSON:
    name = _path_param("name", "an endpoint's name (this gateway's are listed as examples)")
    name["schema"] = {"type": "string", "examples": endpoint_names}
    endpoint_session = {
        "parameters": [name],
        "get": {
            "summary": "An endpoint's session settings as they apply now",
            "responses": _answers({"200": _json(_ref("EndpointSession"), "settings")}),
        },
        "put": {
            "summary": "Merge session settings into the endpoint's runtime override (open sessions at once)",
            "requestBody": _body(_ref("SessionSettings")),
            "responses": _answers({"200": _json(_ref("EndpointSession"), "settings now")}, "400", "413"),
        },
        "delete": {
            "summary": "Drop the runtime override: back to the file's settings",
            "responses": _answers({"200": _json(_ref("EndpointSession"), "settings now")}, "400"),
        },
    }
    organisation_session = {
        "get": {
            "summary": "The organisation's default, cap and bounds as they apply now",
            "responses": _answers({"200": _json(_ref("OrganisationSession"), "settings")}),
        },
        "put": {
            "summary": "Merge organisation settings into the runtime override",
            "requestBody": _body(_ref("OrganisationSettings")),
            "responses": _answers({"200": _json(_ref("OrganisationSession"), "settings now")}, "400", "413"),
        },
        "delete": {
            "summary": "Drop the organisation override: back to the file's settings",
            "responses": _answers({"200": _json(_ref("OrganisationSession"), "settings now")}, "400"),
        },
    }
    return {
        "/admin/sessions": {
            "get": {
                "summary": "Sessions, newest first, a page at a time",
                "parameters": [
                    _query("state", {"enum": ["open", "closed"]}, "only sessions in this state"),
                    _query("endpoint", {"type": "string"}, "only sessions of this endpoint"),
                    _query("cursor", {"type": "string"}, "`next` of the previous page"),
                    _LIMIT,
                ],
                "responses": _answers({"200": _json(_ref("SessionPage"), "a page")}, "400"),
            }
        },
        "/admin/sessions/{id}": {
            "parameters": [_SESSION_ID],
            "get": {"summary": "One session", "responses": _answers({"200": _json(_ref("Session"), "the session")})},
        },
        "/admin/sessions/{id}/close": {
            "parameters": [_SESSION_ID],
            "post": {
                "summary": "Close an open session now (reason admin); with its closure notice unless notify is false",
                "requestBody": _body(
                    {"type": "object", "properties": {"notify": {"type": "boolean", "default": True}}}, required=False
                ),
                "responses": _answers({"200": _json(_ref("Session"), "the closed session")}, "400", "409", "413"),
            },
        },
        "/admin/contacts/{contact_id}": {
            "parameters": [_CONTACT_ID],
            "get": {
                "summary": "A contact with its conversations (newest first) and their transcript",
                "responses": _answers({"200": _json(_ref("ContactView"), "the contact")}),
            },
            "delete": {
                "summary": "Erase a contact: sessions, variables, auth profiles, messages (its open session "
                "is closed silently first)",
                "responses": _answers({"204": {"description": "erased"}}),
            },
        },
        "/admin/messages": {
            "post": {
                "summary": "A bot-initiated message; opens a non-interactive session when none is open",
                "requestBody": _body(_ref("BotMessage")),
                "responses": _answers(
                    {
                        "202": _json(
                            {"type": "object", "required": ["session"], "properties": {"session": _ref("Session")}},
                            "queued for delivery",
                        )
                    },
                    "400",
                    "409",
                    "413",
                ),
            }
        },
        "/admin/endpoints/{name}/session": endpoint_session,
        "/admin/organisation/session": organisation_session,
        "/admin/analytics/sessions": {
            "get": {
                "summary": "Sessions started in [since, until) counted by endpoint and kind",
                "parameters": [
                    _query("since", {"type": "string", "format": "date-time"}, "ISO 8601; naive times are UTC"),
                    _query("until", {"type": "string", "format": "date-time"}, "ISO 8601; naive times are UTC"),
                ],
                "responses": _answers({"200": _json(_ref("Analytics"), "counts")}, "400"),
            }
        },
        "/admin/dead-letters": {
            "get": {
                "summary": "Messages given up on, newest first",
                "parameters": [_LIMIT],
                "responses": _answers({"200": _json(_ref("DeadLetters"), "dead letters")}, "400"),
            }
        },
        "/admin/dead-letters/{id}": {
            "parameters": [_MESSAGE_ID],
            "delete": {
                "summary": "Drop a dead letter",
                "responses": _answers({"204": {"description": "deleted"}}, "409"),
            },
        },
        "/admin/dead-letters/{id}/retry": {
            "parameters": [_MESSAGE_ID],
            "post": {
                "summary": "Send a dead letter again, at the end of its conversation's queue",
                "responses": _answers({"202": _json(_ref("OutboundMessage"), "pending again")}, "409"),
            },
        },
        "/admin/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": _answers({"200": _json({"type": "object"}, "OpenAPI 3.1")}),
            }
        },
        "/admin/ui": {
            "get": {
                "summary": "The management page (it asks for the token itself)",
                "security": [],
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                    "404": {"$ref": "#/components/responses/E404"},
                },
            }
        },
    }


def document(endpoint_names: list[str]) -> JSON:
    """The OpenAPI 3.1 document (``endpoint_names``: this gateway's, as examples)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chat-gateway admin API",
            "version": build_version(),
            "description": "Operator API of the chat gateway. Every route needs `Authorization: Bearer "
            "<admin.token>` (but the page, /admin/ui); with no token configured every route answers 404. "
            'Times are ISO 8601 UTC. Every error is `{"error": reason}` (+ `problems` for refused settings).',
        },
        "security": [{"bearer": []}],
        "paths": _paths(endpoint_names),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
            "responses": {f"E{status}": _json(_ref("Error"), text) for status, text in _ERRORS.items()},
        },
    }


async def get_document(request: web.Request) -> web.StreamResponse:
    names = [endpoint.name for endpoint in request.app[SETTINGS].endpoints]
    return web.json_response(document(names))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/openapi.json", get_document)
