"""Web chat end to end: the page, the socket contract, echo, closure on time (S7, S9), refresh
(S17), kept messages for a disconnected conversation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.conftest import make_settings, webchat_endpoint


async def test_page_is_served(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    response = await gateway.client.get("/webchat/web")
    assert response.status == 200
    assert "text/html" in response.headers["Content-Type"]
    assert "new-conversation" in await response.text()


async def test_socket_without_conversation_is_400(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    response = await gateway.client.get("/webchat/web/ws")
    assert response.status == 400


async def test_s7_s9_echo_then_closure_notice_on_time(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """S7 proactive close after inactivity; S9 the closure notice goes to the same conversation."""
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.01, on_close={"messages": ["bye now"]})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "c1")
    await chat.say("hello")
    assert await chat.wait_messages(1, "reply") == ["hello"]
    await chat.wait_messages(1, "closure")
    assert chat.messages("closure") == ["bye now"]
    states = [f["state"] for f in chat.sessions()]
    assert states[0] == "open" and states[-1] == "closed"
    session_id = chat.sessions()[0]["session_id"]
    await gateway.settle()
    session = await gateway.admin_get(f"/admin/sessions/{session_id}")
    assert session["state"] == "closed"
    assert session["close_reason"] == "inactivity"
    assert session["notice"] == "sent"
    assert session["message_count"] == 1
    # On time: committed within 100 ms of the deadline (DESIGN.md).
    from gateway.wire import parse_iso

    lag = parse_iso(session["closed_at"]) - parse_iso(session["expires_at"])
    assert 0 <= lag < 0.1, lag


async def test_malformed_frames_are_ignored(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "c2")
    await chat.ws.send_str("not json")
    await chat.ws.send_json({"type": "message"})
    await chat.ws.send_json(["type", "message"])
    await chat.say("still here")
    assert await chat.wait_messages(1, "reply") == ["still here"]


async def test_s17_refresh_closes_without_notice_and_next_message_opens_new(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "fresh")
    await chat.say("one")
    await chat.wait_messages(1, "reply")
    first_id = chat.sessions()[0]["session_id"]
    await chat.refresh()
    await chat.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames))
    await chat.say("two")
    await chat.wait_messages(2, "reply")
    await chat.wait_for(lambda frames: len([f for f in frames if f.get("state") == "open"]) == 2)
    second_id = [f for f in chat.sessions() if f["state"] == "open"][-1]["session_id"]
    assert second_id != first_id
    await gateway.settle()
    first = await gateway.admin_get(f"/admin/sessions/{first_id}")
    assert first["close_reason"] == "refresh" and first["notice"] == "none"
    assert chat.messages("closure") == []
    second = await gateway.admin_get(f"/admin/sessions/{second_id}")
    assert second["state"] == "open" and second["message_count"] == 1


async def test_messages_for_a_disconnected_conversation_are_kept_and_delivered_once_in_order(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """The closure notice (and a bot message) while no socket is connected arrive, once and in
    order, when the conversation reconnects; also after a restart (they are persisted)."""
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.005, on_close={"messages": ["closed"]})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "away")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    await chat.close()
    # The session closes while nobody is connected; then the bot says something.
    while gateway.manager.open_session("web", "away") is not None:
        await gateway.manager.drain()
        await asyncio.sleep(0.05)
    await gateway.bot_message("web", "away", "news")
    await gateway.manager.drain()
    await gateway.client.close()
    restarted = await start_gateway(settings)
    again = await open_chat(restarted, "away")
    assert await again.wait_messages(2) == ["closed", "news"]
    await restarted.settle()
    third = await open_chat(restarted, "away")  # a second connection gets nothing again
    await third.say("back")
    assert await third.wait_messages(1) == ["back"]
    assert again.messages() == ["closed", "news", "back"]


async def test_s9_notify_false_closes_silently(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """S9: with on_close.notify false the session closes on time and nothing is sent."""
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.005, on_close={"notify": False})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "quiet")
    await chat.say("hi")
    await chat.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames))
    await gateway.settle()
    [session] = (await gateway.admin_get("/admin/contacts/web:quiet"))["conversations"]
    assert (session["close_reason"], session["notice"]) == ("inactivity", "none")
    assert chat.messages() == ["hi"]
    assert gateway.metrics.total("gateway_messages_out_total") == 1  # the echo only
