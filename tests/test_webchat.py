"""Web chat end to end over real WebSockets: the page, server-issued conversations (hello,
resume with the token, history), echo, closure on time (S7, S9), refresh (S17), acks with
dedup, kept messages read from the store with a cap, and the limits of DESIGN.md "Web chat in
public" (origins, messages per socket, new conversations per address, text length)."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.wire import parse_iso
from tests.conftest import make_settings, webchat_endpoint


def db_rows(tmp_path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        return list(conn.execute(sql, params))


async def bot_message(gateway: Any, conversation: str, text: str, endpoint: str = "web") -> None:
    response = await gateway.client.post(
        "/admin/messages",
        json={"endpoint": endpoint, "conversation": conversation, "text": text},
        headers=gateway.admin_headers(),
    )
    assert response.status == 202, await response.text()


def almost(token: str) -> str:
    """The token with one character changed."""
    return token[:10] + ("B" if token[10] == "A" else "A") + token[11:]


async def connect(gateway: Any, endpoint: str = "web", **options: Any) -> aiohttp.ClientWebSocketResponse:
    return await gateway.client.ws_connect(f"/webchat/{endpoint}/ws", **options)


# -- the page ----------------------------------------------------------------------------------


async def test_page_shows_the_title_and_the_configured_strings(tmp_path: Path, start_gateway: Any) -> None:
    strings = {"send": "Envoyer", "lang": "fr", "placeholder": "Votre message </script><b>"}
    endpoints = [
        webchat_endpoint(webchat={"title": "Aide & <conseil>", "strings": strings}),
        webchat_endpoint("plain"),
    ]
    gateway = await start_gateway(make_settings(tmp_path, endpoints))
    response = await gateway.client.get("/webchat/web")
    assert response.status == 200 and "text/html" in response.headers["Content-Type"]
    page = await response.text()
    assert '<html lang="fr">' in page
    assert "<title>Aide &amp; &lt;conseil&gt;</title>" in page
    assert '"send":"Envoyer"' in page and '"new_conversation":"New conversation"' in page
    assert "</script><b>" not in page  # the strings cannot break out of the script
    assert response.headers["Content-Security-Policy"] == "frame-ancestors 'self'"
    plain = await (await gateway.client.get("/webchat/plain")).text()
    assert "<title>plain</title>" in plain  # the default title is the endpoint name


def test_webchat_block_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "endpoints:\n"
        "  - {name: w, channel: webchat, webchat: {allowed_origins: ['https://ok.example', 'https://x.example/path'],"
        " max_messages_per_minute: 0, strings: {sned: x}}}\n"
        "  - {name: s, channel: slack, credentials: {signing_secret: a, bot_token: xoxb-1}, webchat: {}}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_settings(config, environ={})
    assert [line.split(": ", 1)[1] for line in error.value.problems] == [
        "endpoints.w.webchat.allowed_origins[1]: 'https://x.example/path' is not an origin like "
        "https://shop.example.com (no path, no trailing slash)",
        "endpoints.w.webchat.max_messages_per_minute: 0 must be >= 1",
        "endpoints.w.webchat.strings.sned: unknown key (did you mean 'send'?)",
        "endpoints.s.webchat: only for channel webchat (this endpoint is slack)",
    ]
    config.write_text(
        "endpoints: [{name: w, channel: webchat, webchat: {allowed_origins: ['HTTPS://Shop.example:443']}}]\n"
    )
    assert load_settings(config, environ={}).endpoints[0].webchat.allowed_origins == ("https://shop.example",)


# -- identity: hello, resume, history ----------------------------------------------------------


async def test_hello_issues_unguessable_ids_and_only_a_hash_of_the_token_is_stored(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    first = await open_chat(gateway, "one")
    second = await open_chat(gateway, "two")
    for chat in (first, second):
        assert chat.frames[0]["type"] == "hello"  # the first frame
        assert len(chat.conversation) == 32 and int(chat.conversation, 16) >= 0  # 128 bits, hex
        assert len(chat.token) >= 43  # 256 bits, URL-safe base64
    assert first.conversation != second.conversation and first.token != second.token
    stored = dict(db_rows(tmp_path, "SELECT conversation, secret_hash FROM conversation_secrets"))
    assert stored == {chat.conversation: hashlib.sha256(chat.token.encode()).hexdigest() for chat in (first, second)}
    assert first.of_type("history") == []  # a new conversation has no history


async def test_resume_with_the_token_gets_the_history_and_the_session_state(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0)])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "tab")
    await chat.say("hello there", id="m1")
    await chat.wait_messages(1, "reply")
    await chat.say("second")
    await chat.wait_messages(2, "reply")
    await chat.close()
    reloaded = await open_chat(gateway, "tab")  # the page after a reload
    await reloaded.wait_for(lambda frames: len(frames) >= 3)
    hello, history, session = reloaded.frames[:3]
    assert (hello["conversation"], hello["token"]) == (chat.conversation, chat.token)
    assert history == {
        "type": "history",
        "messages": [
            {"from": "user", "text": "hello there", "kind": "message", "id": "m1"},
            {"from": "bot", "text": "hello there", "kind": "reply"},
            {"from": "user", "text": "second", "kind": "message", "id": history["messages"][2]["id"]},
            {"from": "bot", "text": "second", "kind": "reply"},
        ],
    }
    assert session == {"type": "session", "state": "open", "session_id": chat.sessions()[0]["session_id"]}
    # After a restart (same database) the token still opens the conversation.
    await gateway.client.close()
    restarted = await start_gateway(settings)
    again = await open_chat(restarted, "tab")
    await again.wait_for(lambda frames: len(frames) >= 2)
    assert again.conversation == chat.conversation
    assert [m["text"] for m in again.of_type("history")[0]["messages"]] == ["hello there"] * 2 + ["second"] * 2


async def test_no_conversation_fixation_a_socket_never_joins_without_the_token(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """A link with someone else's conversation id (with no token, a wrong one, or an id the
    server never issued) gets a new conversation: the attacker reads nothing of the victim's."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    victim = await open_chat(gateway, "victim")
    attempts = [
        {"conversation": victim.conversation},
        {"conversation": victim.conversation, "token": "guess"},
        {"conversation": victim.conversation, "token": almost(victim.token)},
        {"conversation": "0" * 32, "token": victim.token},
        {"conversation": "victim", "token": victim.token},
    ]
    attackers = []
    for params in attempts:
        ws = await connect(gateway, params=params)
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello" and hello["conversation"] not in (victim.conversation, params["conversation"])
        attackers.append(ws)
    await victim.say("my card is 4111 1111 1111 1111")
    assert await victim.wait_messages(1) == ["my card is 4111 1111 1111 1111"]
    for ws in attackers:
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)  # nothing: not the victim's echo, not its session frame
        await ws.close()
    assert len(db_rows(tmp_path, "SELECT 1 FROM conversation_secrets")) == 1 + len(attempts)


# -- messages: echo, acks, dedup, refresh -------------------------------------------------------


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
    assert session["state"] == "closed" and session["conversation"] == chat.conversation
    assert session["close_reason"] == "inactivity"
    assert session["notice"] == "sent"
    assert session["message_count"] == 1
    # On time: committed within 100 ms of the deadline (DESIGN.md).
    lag = parse_iso(session["closed_at"]) - parse_iso(session["expires_at"])
    assert 0 <= lag < 0.1, lag


async def test_a_message_id_is_acknowledged_and_a_repeat_is_not_handled_twice(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "acks")
    await chat.say("once", id="a-1")
    await chat.wait_for(lambda frames: chat.acks() == ["a-1"])
    await chat.say("once", id="a-1")  # the page resends what it has no ack for
    await chat.say("no id")  # handled, not acknowledged
    await chat.wait_for(lambda frames: chat.acks() == ["a-1", "a-1"])
    assert await chat.wait_messages(2) == ["once", "no id"]
    await chat.close()
    again = await open_chat(gateway, "acks")  # a resend after a reconnect is still a repeat
    await again.say("once", id="a-1")
    await again.say("next", id="a-2")
    await again.wait_for(lambda frames: again.acks() == ["a-1", "a-2"])
    await again.wait_messages(1, "reply")
    await gateway.settle()
    assert chat.messages() == ["once", "no id"] and again.messages() == ["next"]
    [session] = (await gateway.admin_get(f"/admin/contacts/web:{chat.conversation}"))["conversations"]
    assert session["message_count"] == 3
    assert gateway.metrics.value("gateway_events_total", endpoint="web", outcome="duplicate") == 2


async def test_malformed_frames_are_ignored(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "c2")
    await chat.ws.send_str("not json")
    await chat.ws.send_json({"type": "message"})
    await chat.ws.send_json(["type", "message"])
    await chat.ws.send_json({"type": "message", "text": "bad id", "id": 7})
    await chat.ws.send_bytes(b"\x00\x01")
    await chat.say("still here")
    assert await chat.wait_messages(1, "reply") == ["still here"]
    assert not chat.ws.closed


async def test_s17_refresh_closes_without_notice_the_conversation_stays_and_the_history_is_empty(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "fresh")
    await chat.say("one")
    await chat.wait_messages(1, "reply")
    first_id = chat.sessions()[0]["session_id"]
    await chat.ws.send_json({"type": "refresh", "id": "r-1"})
    await chat.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames) and "r-1" in chat.acks())
    reloaded = await open_chat(gateway, "fresh")
    await reloaded.wait_for(lambda frames: len(frames) >= 2)
    assert reloaded.conversation == chat.conversation  # a new id comes only with a new hello
    assert reloaded.frames[1] == {"type": "history", "messages": []}  # the user asked for a fresh start
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


async def test_s9_notify_false_closes_silently(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """S9: with on_close.notify false the session closes on time and nothing is sent."""
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.005, on_close={"notify": False})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "quiet")
    await chat.say("hi")
    await chat.wait_for(lambda frames: any(f.get("state") == "closed" for f in frames))
    await gateway.settle()
    [session] = (await gateway.admin_get(f"/admin/contacts/web:{chat.conversation}"))["conversations"]
    assert (session["close_reason"], session["notice"]) == ("inactivity", "none")
    assert chat.messages() == ["hi"]
    assert gateway.metrics.total("gateway_messages_out_total") == 1  # the echo only


# -- kept messages ------------------------------------------------------------------------------


async def test_messages_for_a_disconnected_conversation_are_kept_in_the_store_and_delivered_once_in_order(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """The closure notice (and a bot message) while no socket is connected wait in the store,
    not in memory, and arrive once and in order when the conversation reconnects, after the
    history and the session's closed state; also after a restart (they are not loaded at start)."""
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.005, on_close={"messages": ["closed"]})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "away")
    await chat.say("hi")
    await chat.wait_messages(1, "reply")
    await chat.close()
    # The session closes while nobody is connected; then the bot says something.
    while gateway.manager.open_session("web", chat.conversation) is not None:
        await gateway.manager.drain()
        await asyncio.sleep(0.05)
    await bot_message(gateway, chat.conversation, "news")
    await gateway.settle()
    assert gateway.outbox.pending == 0  # nothing held in memory for the absent user
    await gateway.client.close()
    restarted = await start_gateway(settings)
    assert restarted.outbox.pending == 0  # ... nor loaded at start
    again = await open_chat(restarted, "away")
    assert await again.wait_messages(2) == ["closed", "news"]
    kinds = [f["type"] for f in again.frames]
    assert kinds[:3] == ["hello", "history", "session"] and kinds.count("message") == 2
    # The history is that of the latest session: the one "news" opened (non-interactive).
    assert again.of_type("history")[0]["messages"] == []
    await restarted.settle()
    third = await open_chat(restarted, "away")  # a second connection gets nothing again
    await third.say("back")
    assert await third.wait_messages(1) == ["back"]
    assert again.messages() == ["closed", "news", "back"]


async def test_a_closure_while_away_shows_the_closed_transcript_then_the_notice(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0.005, on_close={"messages": ["ended"]})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "gone")
    await chat.say("question")
    await chat.wait_messages(1, "reply")
    session_id = chat.sessions()[0]["session_id"]
    await chat.close()
    while gateway.manager.open_session("web", chat.conversation) is not None:
        await asyncio.sleep(0.05)
    back = await open_chat(gateway, "gone")
    await back.wait_messages(1, "closure")
    assert back.frames[1:] == [
        {
            "type": "history",
            "messages": [
                {"from": "user", "text": "question", "kind": "message", "id": back.frames[1]["messages"][0]["id"]},
                {"from": "bot", "text": "question", "kind": "reply"},
            ],
        },
        {"type": "session", "state": "closed", "session_id": session_id},
        {"type": "message", "text": "ended", "kind": "closure"},
    ]


async def test_at_most_max_kept_messages_are_kept_older_ones_dropped_and_counted(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(minutes=0, webchat={"max_kept_messages": 3})])
    gateway = await start_gateway(settings)
    chat = await open_chat(gateway, "inbox")
    await chat.close()
    for n in range(6):
        await bot_message(gateway, chat.conversation, f"n{n}")
        await gateway.settle()
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="web", outcome="dropped") == 3
    assert db_rows(tmp_path, "SELECT text, state, last_error FROM outbox WHERE state != 'pending' ORDER BY id") == [
        (f"n{n}", "skipped", "dropped: more than 3 messages kept for a conversation nobody reads") for n in range(3)
    ]
    back = await open_chat(gateway, "inbox")
    assert await back.wait_messages(3) == ["n3", "n4", "n5"]
    await gateway.settle()
    assert db_rows(tmp_path, "SELECT count(*) FROM outbox WHERE state = 'pending'") == [(0,)]


# -- limits -------------------------------------------------------------------------------------


async def test_origins_other_than_the_own_and_the_allowed_are_refused(tmp_path: Path, start_gateway: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(webchat={"allowed_origins": ["https://shop.example"]})])
    gateway = await start_gateway(settings)
    own = f"http://{gateway.client.host}:{gateway.client.port}"
    for origin in ("https://evil.example", "null", "https://shop.example.evil.example", "http://127.0.0.1:1"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(gateway, headers={"Origin": origin})
        assert refused.value.status == 403, origin
    for headers in ({"Origin": "https://shop.example"}, {"Origin": "HTTPS://SHOP.EXAMPLE"}, {"Origin": own}, {}):
        ws = await connect(gateway, headers=headers)
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        await ws.close()
    page = await gateway.client.get("/webchat/web")
    assert page.headers["Content-Security-Policy"] == "frame-ancestors 'self' https://shop.example"
    assert len(db_rows(tmp_path, "SELECT 1 FROM conversation_secrets")) == 4  # nothing for the refused


async def test_new_conversations_per_address_are_limited_resumes_are_not(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint(webchat={"max_new_conversations_per_hour": 3})])
    gateway = await start_gateway(settings)
    for _ in range(5):  # plain GETs are no hellos: 400, nothing issued, nothing charged
        assert (await gateway.client.get("/webchat/web/ws")).status == 400
    chats = [await open_chat(gateway, f"v{n}") for n in range(3)]
    for params in ({}, {"conversation": chats[0].conversation, "token": "wrong"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await connect(gateway, params=params)
        assert refused.value.status == 429
    resumed = await open_chat(gateway, "v1")  # a resume is not a new conversation
    assert resumed.conversation == chats[1].conversation
    assert len(db_rows(tmp_path, "SELECT 1 FROM conversation_secrets")) == 3


async def test_messages_per_socket_are_limited(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(
        make_settings(tmp_path, [webchat_endpoint(minutes=0, webchat={"max_messages_per_minute": 4})])
    )
    chat = await open_chat(gateway, "fast")
    for n in range(7):
        await chat.say(f"m{n}", id=f"id{n}")
    await chat.wait_for(lambda frames: len(chat.acks()) + len(chat.of_type("error")) == 7)
    assert chat.acks() == ["id0", "id1", "id2", "id3"]
    assert chat.of_type("error") == [{"type": "error", "reason": "rate_limited", "id": f"id{n}"} for n in (4, 5, 6)]
    assert await chat.wait_messages(4) == ["m0", "m1", "m2", "m3"]
    other = await open_chat(gateway, "fast")  # another tab: its own budget
    await other.say("m4", id="id4")
    await other.wait_for(lambda frames: other.acks() == ["id4"])


async def test_a_text_over_max_text_chars_is_refused(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    gateway = await start_gateway(
        make_settings(tmp_path, [webchat_endpoint(minutes=0, webchat={"max_text_chars": 10})])
    )
    chat = await open_chat(gateway, "long")
    await chat.say("x" * 11, id="long")
    await chat.say("y" * 10, id="fits")
    await chat.wait_for(lambda frames: chat.acks() == ["fits"])
    assert chat.of_type("error") == [{"type": "error", "reason": "too_long", "id": "long"}]
    assert await chat.wait_messages(1) == ["y" * 10]


async def test_a_frame_flood_logs_one_line_per_socket_per_minute(
    tmp_path: Path, start_gateway: Any, open_chat: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(
        make_settings(tmp_path, [webchat_endpoint(minutes=0, webchat={"max_messages_per_minute": 2})])
    )
    chat = await open_chat(gateway, "flood")
    caplog.set_level("WARNING", logger="channels.webchat")
    for n in range(300):
        await chat.ws.send_str("garbage" if n % 2 else '{"type": "message", "text": "x"}')
    await chat.wait_for(lambda frames: len(chat.of_type("error")) == 298)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "channels.webchat"]

    assert len(lines()) == 1 and "refused 1 (malformed=1)" in lines()[0]  # the first refusal, at once
    await chat.close()  # the rest is summed up when the socket closes (or a minute later)
    async with asyncio.timeout(5):
        while len(lines()) < 2:
            await asyncio.sleep(0.01)
    assert len(lines()) == 2 and "refused 298 in the last" in lines()[1] and "(rate_limited=298)" in lines()[1]
