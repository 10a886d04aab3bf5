"""Operator surface: /healthz, /metrics, the admin API's auth and shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import make_settings, webchat_endpoint


async def test_healthz_and_metrics(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    response = await gateway.client.get("/healthz")
    assert response.status == 200
    chat = await open_chat(gateway, "m")
    await chat.say("x")
    await chat.wait_messages(1)
    await gateway.settle()
    text = await (await gateway.client.get("/metrics")).text()
    assert 'gateway_sessions_opened_total{endpoint="web"} 1' in text
    assert 'gateway_events_total{endpoint="web",outcome="accepted"} 1' in text
    assert 'gateway_messages_out_total{endpoint="web",outcome="sent"} 1' in text
    assert "gateway_open_sessions 1" in text


async def test_admin_is_404_without_token(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()], admin={"token": ""}))
    response = await gateway.client.get("/admin/sessions", headers={"Authorization": "Bearer x"})
    assert response.status == 404


async def test_admin_needs_the_right_bearer(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    assert (await gateway.client.get("/admin/sessions")).status == 401
    wrong = await gateway.client.get("/admin/sessions", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401
    right = await gateway.client.get("/admin/sessions", headers=gateway.admin_headers())
    assert right.status == 200
    assert await right.json() == {"sessions": [], "next": None}


async def test_admin_sessions_list_filter_page_and_close(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint("a", minutes=0), webchat_endpoint("b", minutes=0)])
    gateway = await start_gateway(settings)
    for endpoint, conversation in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1")]:
        chat = await open_chat(gateway, conversation, endpoint=endpoint)
        await chat.say("hi")
        await chat.wait_messages(1)
    first = await gateway.admin_get("/admin/sessions?endpoint=a&limit=2")
    assert len(first["sessions"]) == 2 and first["next"]
    rest = await gateway.admin_get(f"/admin/sessions?endpoint=a&limit=2&cursor={first['next']}")
    ids = [s["id"] for s in first["sessions"] + rest["sessions"]]
    assert len(set(ids)) == 3 and rest["next"] is None
    target = ids[0]
    closed = await gateway.client.post(
        f"/admin/sessions/{target}/close", json={"notify": False}, headers=gateway.admin_headers()
    )
    assert closed.status == 200
    body = await closed.json()
    assert body["state"] == "closed" and body["close_reason"] == "admin" and body["notice"] == "none"
    again = await gateway.client.post(f"/admin/sessions/{target}/close", headers=gateway.admin_headers())
    assert again.status == 409
    missing = await gateway.client.post("/admin/sessions/nope/close", headers=gateway.admin_headers())
    assert missing.status == 404
    open_a = await gateway.admin_get("/admin/sessions?state=open&endpoint=a")
    assert len(open_a["sessions"]) == 2
    closed_all = await gateway.admin_get("/admin/sessions?state=closed")
    assert [s["id"] for s in closed_all["sessions"]] == [target]
    bad = await gateway.client.get("/admin/sessions?state=weird", headers=gateway.admin_headers())
    assert bad.status == 400


async def test_admin_close_with_notice_reaches_the_user(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0, on_close={"messages": ["ended by staff"]})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "c")
    await chat.say("hi")
    await chat.wait_messages(1)
    session_id = chat.sessions()[0]["session_id"]
    response = await gateway.client.post(f"/admin/sessions/{session_id}/close", headers=gateway.admin_headers())
    assert response.status == 200
    assert await chat.wait_messages(1, "closure") == ["ended by staff"]


async def test_s6_contact_keeps_every_conversation(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """S6: sessions end so the contact profile holds several conversations, newest first."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.005)]))
    chat = await open_chat(gateway, "hist")
    for n in range(2):
        await chat.say(f"visit {n}")
        await chat.wait_messages(n + 1, "closure")
    body = await gateway.admin_get(f"/admin/contacts/web:{chat.conversation}")
    assert body["contact"]["id"] == f"web:{chat.conversation}" and body["contact"]["opted_out"] is False
    conversations = body["conversations"]
    assert len(conversations) == 2 and all(s["state"] == "closed" for s in conversations)
    assert conversations[0]["started_at"] > conversations[1]["started_at"]
    missing = await gateway.client.get("/admin/contacts/web:nobody", headers=gateway.admin_headers())
    assert missing.status == 404
