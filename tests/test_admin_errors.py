"""Every admin error answers one JSON shape (DESIGN.md "Operating it"): ``{"error": reason}``,
with ``"problems"`` for a refused settings change, and the status of its kind. Real HTTP
requests to the real app; the error middleware (gateway.http_errors) is the only place that
answers them. Webhook rejections keep their own ``{"error": reason}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse

from tests.conftest import Gateway, make_settings, webchat_endpoint
from tests.kits.line import body_of, sign, text_event

LINE_SECRET = "admin-errors-line-secret"


def line_endpoint() -> dict[str, Any]:
    return {
        "name": "ln",
        "channel": "line",
        "api_base_url": "http://127.0.0.1:9",  # never called: these tests send nothing
        "credentials": {"channel_secret": LINE_SECRET, "channel_access_token": "token"},
    }


async def error_of(response: ClientResponse, status: int) -> dict[str, Any]:
    """The JSON error body of ``response``, after checking its status and content type."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json", await response.text()
    body = await response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert set(body) <= {"error", "problems"}, body
    return body


@pytest.fixture
async def gateway(tmp_path: Path, start_gateway: Any) -> Gateway:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=30), line_endpoint()], server={"max_body_bytes": 1024})
    running: Gateway = await start_gateway(settings)
    return running


async def admin(gateway: Gateway, method: str, path: str, **kwargs: Any) -> ClientResponse:
    return await gateway.client.request(method, path, headers=gateway.admin_headers(), **kwargs)


async def open_session(gateway: Gateway, conversation: str) -> str:
    """A bot message opens a session (its message waits for a socket: it stays pending)."""
    body = {"endpoint": "web", "conversation": conversation, "text": "hello"}
    response = await admin(gateway, "POST", "/admin/messages", json=body)
    assert response.status == 202, await response.text()
    session_id: str = (await response.json())["session"]["id"]
    return session_id


# -- 404: what the request names does not exist ----------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "reason"),
    [
        ("GET", "/admin/sessions/nope", None, "no such session"),
        ("POST", "/admin/sessions/nope/close", None, "no such session"),
        ("GET", "/admin/contacts/web:nobody", None, "no such contact"),
        ("POST", "/admin/messages", {"endpoint": "nope", "conversation": "c", "text": "t"}, "no such endpoint"),
        ("GET", "/admin/endpoints/nope/session", None, "no such endpoint"),
        ("PUT", "/admin/endpoints/nope/session", {"mode": "lazy"}, "no such endpoint"),
        ("DELETE", "/admin/endpoints/nope/session", None, "no such endpoint"),
        ("POST", "/admin/dead-letters/424242/retry", None, "no such message"),
        ("POST", "/admin/dead-letters/not-a-number/retry", None, "no such message"),
    ],
)
async def test_not_found_kinds(gateway: Gateway, method: str, path: str, body: Any, reason: str) -> None:
    response = await admin(gateway, method, path, json=body)
    assert await error_of(response, 404) == {"error": reason}


# -- 409: it exists, but its state forbids the request ----------------------------------------


async def test_closing_a_closed_session_is_409(gateway: Gateway) -> None:
    session_id = await open_session(gateway, "c409")
    path = f"/admin/sessions/{session_id}/close"
    assert (await admin(gateway, "POST", path, json={"notify": False})).status == 200
    assert await error_of(await admin(gateway, "POST", path), 409) == {"error": "session is closed already"}


async def test_retrying_a_message_that_is_not_dead_is_409(gateway: Gateway) -> None:
    await open_session(gateway, "pending")
    (pending,) = await gateway.store.pending_outbox()
    response = await admin(gateway, "POST", f"/admin/dead-letters/{pending.id}/retry")
    assert await error_of(response, 409) == {"error": "message is not a dead letter"}


# -- 400: bad input ---------------------------------------------------------------------------


async def test_refused_settings_are_400_with_problems(gateway: Gateway) -> None:
    response = await admin(gateway, "PUT", "/admin/endpoints/web/session", json={"expiration_minutes": -1})
    body = await error_of(response, 400)
    problems = body["problems"]
    assert isinstance(problems, list) and problems and all(isinstance(p, str) for p in problems), body
    assert problems[0].startswith("session.expiration_minutes: "), body
    assert body["error"] == "; ".join(problems)


async def test_refused_organisation_settings_are_400_with_problems(gateway: Gateway) -> None:
    response = await admin(gateway, "PUT", "/admin/organisation/session", json={"max_minutes": "many"})
    body = await error_of(response, 400)
    assert body["problems"] and body["error"] == "; ".join(body["problems"])


@pytest.mark.parametrize(
    ("data", "reason"),
    [("{not json", "body is not JSON"), ("[1, 2]", "body must be a JSON object")],
)
async def test_a_body_that_is_not_a_json_object_is_400(gateway: Gateway, data: str, reason: str) -> None:
    headers = {**gateway.admin_headers(), "Content-Type": "application/json"}
    for method, path in [("POST", "/admin/messages"), ("PUT", "/admin/endpoints/web/session")]:
        response = await gateway.client.request(method, path, data=data, headers=headers)
        assert await error_of(response, 400) == {"error": reason}


@pytest.mark.parametrize(
    "path",
    [
        "/admin/sessions?state=weird",
        "/admin/sessions?limit=many",
        "/admin/dead-letters?limit=many",
        "/admin/analytics/sessions?since=yesterday",
    ],
)
async def test_bad_query_is_400(gateway: Gateway, path: str) -> None:
    body = await error_of(await admin(gateway, "GET", path), 400)
    assert "problems" not in body


async def test_missing_message_fields_are_400(gateway: Gateway) -> None:
    response = await admin(gateway, "POST", "/admin/messages", json={"endpoint": "web"})
    assert await error_of(response, 400) == {"error": '"endpoint", "conversation" and "text" are required strings'}


# -- 401 and the admin API switched off -------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer nope", "test-admin-token"])
async def test_missing_or_wrong_token_is_401(gateway: Gateway, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in [("GET", "/admin/sessions"), ("POST", "/admin/messages"), ("GET", "/admin/unknown")]:
        response = await gateway.client.request(method, path, headers=headers)
        assert await error_of(response, 401) == {"error": "missing or wrong bearer token"}
        assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_admin_off_is_404_like_an_unknown_route(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()], admin={"token": ""}))
    for headers in [{}, {"Authorization": "Bearer x"}]:
        response = await gateway.client.get("/admin/sessions", headers=headers)
        assert await error_of(response, 404) == {"error": "not found"}
        assert "WWW-Authenticate" not in response.headers


# -- aiohttp's own errors on /admin -----------------------------------------------------------


async def test_unknown_admin_route_is_404(gateway: Gateway) -> None:
    for path in ["/admin/nothing-here", "/admin/sessions/a/b/c", "/admin"]:
        assert await error_of(await admin(gateway, "GET", path), 404) == {"error": "not found"}


async def test_wrong_method_is_405_and_names_the_allowed_ones(gateway: Gateway) -> None:
    response = await admin(gateway, "DELETE", "/admin/sessions")
    assert await error_of(response, 405) == {"error": "method not allowed"}
    assert "GET" in response.headers["Allow"]


async def test_too_large_a_body_is_413(gateway: Gateway) -> None:
    body = {"endpoint": "web", "conversation": "big", "text": "x" * 4096}
    response = await admin(gateway, "POST", "/admin/messages", json=body)
    assert (await error_of(response, 413))["error"]


async def test_an_unexpected_failure_is_500_and_logged(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(contact_id: str) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gateway.store, "get_contact", broken)
    response = await admin(gateway, "GET", "/admin/contacts/web:x")
    assert await error_of(response, 500) == {"error": "internal error"}
    assert "disk on fire" not in await response.text()
    assert any(r.name == "gateway.http" and r.exc_info for r in caplog.records)


# -- outside /admin: aiohttp's own answers, and webhook rejections as before ------------------


async def test_errors_outside_admin_keep_their_shape(gateway: Gateway) -> None:
    unknown = await gateway.client.get("/nothing-here")
    assert unknown.status == 404 and unknown.content_type == "text/plain"
    body = body_of(text_event("hi"))
    headers = {"Content-Type": "application/json", "x-line-signature": sign(body, "wrong-secret")}
    rejected = await gateway.client.post("/webhooks/ln", data=body, headers=headers)
    body = await error_of(rejected, 401)
    assert set(body) == {"error"} and "WWW-Authenticate" not in rejected.headers
    no_handshake = await gateway.client.get("/webhooks/ln")
    assert await error_of(no_handshake, 400) == {"error": "no GET handshake for LINE"}
    not_a_socket = await gateway.client.get("/webchat/web/ws")
    assert await error_of(not_a_socket, 400) == {"error": "this route takes a WebSocket upgrade"}
