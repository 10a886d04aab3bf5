"""Slack end to end: real HTTP requests signed with slack-sdk's own signer to the real app, the
recording fake Slack Web API on 127.0.0.1, real SQLite, echo flow. Proves chat.postMessage
addressing (channel, thread), signature and timestamp checks, url_verification, dedup of
retries (also across a restart), the S7/S9 closure to the same channel and thread, S16
housekeeping (bots, subtypes, our own user) and the 429 Retry-After wait."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from slack_sdk.signature import SignatureVerifier

from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.signed import post_raw

SIGNING_SECRET = "e2e-slack-signing-secret"
BOT_TOKEN = "xoxb-e2e-bot-token"
BOT_USER = "UBOT"
POST = "/api/chat.postMessage"
AUTH_TEST = "/api/auth.test"
POSTED = Answer(json_body={"ok": True, "channel": "C1", "ts": "1700000099.000100"})
LONG = 30.0  # minutes: no closure during the test
SHORT = 0.01  # minutes: 0.6 s of silence closes the session
BYE = "bye"
THREAD = "1700000000.000100"


# -- helpers ----------------------------------------------------------------------------------


def slack_endpoint(api_url: str, *, minutes: float = LONG, bot_user_id: str | None = BOT_USER) -> dict[str, Any]:
    credentials = {"signing_secret": SIGNING_SECRET, "bot_token": BOT_TOKEN}
    if bot_user_id is not None:
        credentials["bot_user_id"] = bot_user_id
    return {
        "name": "sl",
        "channel": "slack",
        "api_base_url": api_url,
        "credentials": credentials,
        "session": {"expiration_minutes": minutes, "on_close": {"messages": [BYE]}},
    }


def message(
    text: str, *, channel: str = "C1", user: str | None = "U1", thread_ts: str | None = None, **extra: Any
) -> dict[str, Any]:
    ts = f"{time.time():.6f}"
    event: dict[str, Any] = {
        "type": "message",
        "channel": channel,
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
        "channel_type": "channel",
    }
    if thread_ts is not None:
        event["thread_ts"] = thread_ts
    event.update(extra)
    return event


def callback(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy",
        "team_id": "T1",
        "api_app_id": "A1",
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "event": event,
    }


def encode(payload: Any) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


def signed_headers(body: bytes, *, timestamp: str | None = None, secret: str = SIGNING_SECRET) -> dict[str, str]:
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}


async def post(
    gateway: Gateway, payload: Any, *, headers: dict[str, str] | None = None, retry_num: int | None = None
) -> tuple[int, str]:
    """POST to the webhook, signed now unless ``headers`` are given (then sent as they are)."""
    body = encode(payload)
    sent = {"Content-Type": "application/json", **(signed_headers(body) if headers is None else headers)}
    if retry_num is not None:
        sent |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
    response = await gateway.client.post("/webhooks/sl", data=body, headers=sent)
    return response.status, await response.text()


async def contact(gateway: Gateway, conversation: str) -> dict[str, Any] | None:
    response = await gateway.client.get(f"/admin/contacts/sl:{conversation}", headers=gateway.admin_headers())
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def only_session(gateway: Gateway, conversation: str) -> dict[str, Any]:
    found = await contact(gateway, conversation)
    assert found is not None, f"no contact for {conversation}"
    [session] = found["conversations"]
    return dict(session)


async def no_sessions(gateway: Gateway) -> bool:
    listed: dict[str, Any] = await gateway.admin_get("/admin/sessions?endpoint=sl")
    return len(listed["sessions"]) == 0


def inbound_rows(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM inbound").fetchone()[0])


async def assert_nothing_stored(gateway: Gateway, tmp_path: Path, api: FakePlatform) -> None:
    await gateway.settle()
    assert await contact(gateway, "C1") is None
    assert await no_sessions(gateway)
    assert inbound_rows(tmp_path) == 0
    assert api.to(POST) == []


def posted(request: RecordedRequest) -> dict[str, Any]:
    body: dict[str, Any] = request.json()
    return body


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as fake:
        fake.respond(POST, POSTED)
        yield fake


# -- text in, echo out ------------------------------------------------------------------------


async def test_top_level_text_is_echoed_to_the_channel_with_the_bot_token(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    assert await post(gateway, callback(message("hello <@U2> &lt;b&gt;"))) == (200, "")
    [sent] = await api.wait_for(1, POST)
    await gateway.settle()
    assert sent.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    body = posted(sent)
    assert body["channel"] == "C1" and body["text"] == "hello <@U2> &lt;b&gt;"
    assert "thread_ts" not in body
    assert api.to(AUTH_TEST) == []  # bot_user_id configured: no auth.test
    session = await only_session(gateway, "C1")
    assert (session["channel"], session["conversation"], session["contact_id"]) == ("slack", "C1", "sl:C1")
    assert session["state"] == "open" and session["message_count"] == 1


async def test_thread_reply_is_echoed_in_its_thread(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    assert (await post(gateway, callback(message("in thread", thread_ts=THREAD))))[0] == 200
    [sent] = await api.wait_for(1, POST)
    await gateway.settle()
    assert posted(sent) == {"channel": "C1", "text": "in thread", "thread_ts": THREAD}
    assert (await only_session(gateway, f"C1:{THREAD}"))["message_count"] == 1
    assert await contact(gateway, "C1") is None  # the thread is its own conversation


async def test_thread_parent_with_thread_ts_equal_to_ts_is_top_level(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    event = message("parent")
    event["thread_ts"] = event["ts"]
    assert (await post(gateway, callback(event)))[0] == 200
    [sent] = await api.wait_for(1, POST)
    await gateway.settle()
    assert "thread_ts" not in posted(sent)
    assert (await only_session(gateway, "C1"))["message_count"] == 1


# -- signatures, timestamps, bodies, sizes, handshake -----------------------------------------


def _forged(body: bytes, case: str) -> dict[str, str]:
    now = int(time.time())
    if case == "missing-signature":
        return {"X-Slack-Request-Timestamp": str(now)}
    if case == "missing-timestamp":
        return {"X-Slack-Signature": signed_headers(body)["X-Slack-Signature"]}
    if case == "none":
        return {}
    if case == "other-secret":
        return signed_headers(body, secret="not-the-signing-secret")
    if case == "other-body":
        return {**signed_headers(b'{"type":"other"}'), "X-Slack-Request-Timestamp": str(now)}
    if case == "wrong-hex":
        return {"X-Slack-Request-Timestamp": str(now), "X-Slack-Signature": "v0=" + "0" * 64}
    if case == "stale-301s":
        return signed_headers(body, timestamp=str(now - 301))
    if case == "future-301s":
        return signed_headers(body, timestamp=str(now + 301))
    if case == "non-numeric-timestamp":
        return signed_headers(body, timestamp="yesterday")
    if case == "huge-timestamp":
        return signed_headers(body, timestamp="9" * 5000)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing-signature",
        "missing-timestamp",
        "none",
        "other-secret",
        "other-body",
        "wrong-hex",
        "stale-301s",
        "future-301s",
        "non-numeric-timestamp",
        "huge-timestamp",
    ],
)
async def test_forged_missing_or_stale_signature_is_401_and_stores_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, case: str
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    body = encode(callback(message("hello")))
    status, _ = await post(gateway, body, headers=_forged(body, case))
    assert status == 401
    await assert_nothing_stored(gateway, tmp_path, api)


async def test_timestamp_299s_old_is_still_accepted(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    body = encode(callback(message("just in time")))
    status, _ = await post(gateway, body, headers=signed_headers(body, timestamp=str(int(time.time()) - 299)))
    assert status == 200
    await api.wait_for(1, POST)


@pytest.mark.parametrize(
    "raw_signature", [b"v0=\xc3\xa9" + b"0" * 62, b"v0=\xff\xfe"], ids=["utf8-e-acute", "not-utf8"]
)
async def test_non_ascii_signature_header_is_401_not_500(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, raw_signature: bytes
) -> None:
    """Bad input never becomes a 5xx: a signature header with non-ASCII bytes (sent on a raw
    socket, as any client on the internet can) must be rejected like any wrong signature."""
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    body = encode(callback(message("hello")))
    server = gateway.client.server
    headers = [b"X-Slack-Request-Timestamp: %d" % int(time.time()), b"X-Slack-Signature: " + raw_signature]
    status_line = await post_raw(str(server.host), int(server.port or 0), "/webhooks/sl", headers, body)
    assert status_line.split()[1] == b"401", status_line
    await assert_nothing_stored(gateway, tmp_path, api)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"event_callback"',
        b"{}",
        b'{"type": 7}',
        b'{"type": "event_callback"}',
        b'{"type": "event_callback", "event": "message"}',
        b'{"type": "url_verification"}',
        b"",
        b"[" * 100_000,
    ],
    ids=[
        "not-json",
        "array",
        "string",
        "no-type",
        "type-not-string",
        "no-event",
        "event-not-object",
        "challenge-missing",
        "empty",
        "deeply-nested",
    ],
)
async def test_signed_malformed_body_is_400(tmp_path: Path, start_gateway: Any, api: FakePlatform, body: bytes) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    assert (await post(gateway, body))[0] == 400
    await assert_nothing_stored(gateway, tmp_path, api)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
async def test_oversized_body_is_413_whatever_its_signature(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signed: bool
) -> None:
    settings = make_settings(tmp_path, [slack_endpoint(api.url)], server={"max_body_bytes": 1024})
    gateway = await start_gateway(settings)
    body = encode(callback(message("x" * 2000)))
    assert len(body) > 1024
    status, _ = await post(gateway, body, headers=signed_headers(body) if signed else {})
    assert status == 413
    await assert_nothing_stored(gateway, tmp_path, api)
    assert (await post(gateway, callback(message("small"))))[0] == 200
    await api.wait_for(1, POST)


async def test_get_on_the_webhook_is_400_not_5xx(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    response = await gateway.client.get("/webhooks/sl")
    assert response.status == 400
    await assert_nothing_stored(gateway, tmp_path, api)


async def test_url_verification_answers_the_challenge(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    challenge = "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    payload = {"token": "legacy", "challenge": challenge, "type": "url_verification"}
    assert await post(gateway, payload) == (200, challenge)
    # Unsigned, the same handshake is refused: the request URL proves the secret too.
    assert (await post(gateway, payload, headers={}))[0] == 401
    await assert_nothing_stored(gateway, tmp_path, api)


# -- retries (dedup on event_id) --------------------------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["after", "concurrent"])
async def test_retry_with_the_same_event_id_gets_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, together: bool
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    payload = callback(message("once"), event_id="EvRETRY00001")
    if together:
        results = await asyncio.gather(post(gateway, payload), post(gateway, payload, retry_num=1))
        assert [status for status, _ in results] == [200, 200]
    else:
        assert (await post(gateway, payload))[0] == 200
        await api.wait_for(1, POST)
        assert (await post(gateway, payload, retry_num=1))[0] == 200
        assert (await post(gateway, payload, retry_num=2))[0] == 200
    await gateway.settle()
    assert [posted(r)["text"] for r in api.to(POST)] == ["once"]
    assert (await only_session(gateway, "C1"))["message_count"] == 1


async def test_retry_after_a_restart_on_the_same_database_gets_no_second_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    settings = make_settings(tmp_path, [slack_endpoint(api.url)])
    gateway = await start_gateway(settings)
    payload = callback(message("before restart"), event_id="EvRESTART001")
    assert (await post(gateway, payload))[0] == 200
    await api.wait_for(1, POST)
    await gateway.settle()
    await gateway.client.close()

    restarted = await start_gateway(settings)
    assert (await post(restarted, payload, retry_num=1))[0] == 200
    await restarted.settle()
    assert len(api.to(POST)) == 1
    session = await only_session(restarted, "C1")
    assert session["state"] == "open" and session["message_count"] == 1
    assert (await post(restarted, callback(message("after restart"))))[0] == 200
    await api.wait_for(2, POST)
    assert posted(api.to(POST)[1])["text"] == "after restart"


# -- closure (S7, S9) -------------------------------------------------------------------------


async def test_s7_s9_thread_closure_notice_goes_once_to_the_same_channel_and_thread(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url, minutes=SHORT)]))
    assert (await post(gateway, callback(message("in thread", channel="C9", thread_ts=THREAD))))[0] == 200
    echo, notice = await api.wait_for(2, POST, timeout_s=5)
    await gateway.settle()
    assert posted(echo) == {"channel": "C9", "text": "in thread", "thread_ts": THREAD}
    assert posted(notice) == {"channel": "C9", "text": BYE, "thread_ts": THREAD}
    assert notice.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    found = await contact(gateway, f"C9:{THREAD}")
    assert found is not None
    [session] = found["conversations"]
    assert session["state"] == "closed"
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    await asyncio.sleep(0.8)  # exactly once: nothing more after another expiration period
    assert len(api.to(POST)) == 2


async def test_s7_s9_top_level_closure_notice_goes_to_the_channel_without_thread(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url, minutes=SHORT)]))
    assert (await post(gateway, callback(message("top", channel="C7"))))[0] == 200
    echo, notice = await api.wait_for(2, POST, timeout_s=5)
    await gateway.settle()
    assert posted(echo) == {"channel": "C7", "text": "top"}
    assert posted(notice) == {"channel": "C7", "text": BYE}
    session = await only_session(gateway, "C7")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"


# -- housekeeping (S16) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        message("from a bot", bot_id="B0OTHER", user="U1"),
        message("from a bot without user", bot_id="B0OTHER", user=None),
        message("bot message", subtype="bot_message", bot_id="B0OTHER"),
        {
            "type": "message",
            "subtype": "message_changed",
            "channel": "C1",
            "hidden": True,
            "ts": "1700000001.000200",
            "message": {"type": "message", "user": "U1", "text": "edited", "ts": "1700000000.000100"},
            "previous_message": {"type": "message", "user": "U1", "text": "orig", "ts": "1700000000.000100"},
        },
        message("gone", subtype="message_deleted"),
        message("joined", subtype="channel_join"),
        message("our own echo", user=BOT_USER),
        {"type": "reaction_added", "user": "U1", "reaction": "thumbsup", "event_ts": "1.2"},
    ],
    ids=[
        "bot_id",
        "bot_id-no-user",
        "bot_message",
        "message_changed",
        "message_deleted",
        "channel_join",
        "own-bot-user",
        "reaction_added",
    ],
)
async def test_s16_bot_messages_subtypes_and_our_own_user_are_200_without_session(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, event: dict[str, Any]
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    assert (await post(gateway, callback(event)))[0] == 200
    await gateway.settle()
    assert await no_sessions(gateway)
    assert await contact(gateway, "C1") is None
    assert api.to(POST) == []
    assert gateway.metrics.value("gateway_events_total", endpoint="sl", outcome="ignored") == 1


async def test_s16_own_bot_user_learned_by_one_auth_test_at_start_is_ignored(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    api.respond(AUTH_TEST, Answer(json_body={"ok": True, "user_id": BOT_USER, "bot_id": "B0BOT"}))
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url, bot_user_id=None)]))
    [auth] = api.to(AUTH_TEST)
    assert auth.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert (await post(gateway, callback(message("our own", user=BOT_USER))))[0] == 200
    await gateway.settle()
    assert await no_sessions(gateway)
    assert (await post(gateway, callback(message("a person", user="U1"))))[0] == 200
    [sent] = await api.wait_for(1, POST)
    assert posted(sent)["text"] == "a person"
    assert len(api.to(AUTH_TEST)) == 1


async def test_s16_file_share_opens_a_session_without_echo(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    event = message("", subtype="file_share", files=[{"id": "F1", "name": "a.png", "mimetype": "image/png"}])
    assert (await post(gateway, callback(event)))[0] == 200
    await gateway.settle()
    session = await only_session(gateway, "C1")
    assert session["state"] == "open" and session["message_count"] == 1
    assert api.to(POST) == []


# -- delivery failures ------------------------------------------------------------------------


async def test_429_with_retry_after_is_delivered_once_after_the_wait(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    seen_at: list[float] = []

    def answer(_request: RecordedRequest) -> Answer:
        seen_at.append(time.monotonic())
        if len(seen_at) == 1:
            return Answer(status=429, json_body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "1"})
        return POSTED

    api.respond(POST, answer)
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url)]))
    assert (await post(gateway, callback(message("patience"))))[0] == 200
    first, retry = await api.wait_for(2, POST, timeout_s=6)
    await gateway.settle()
    assert posted(first) == posted(retry) == {"channel": "C1", "text": "patience"}
    assert retry_gap_s(seen_at) >= 0.95  # waited for Retry-After, not just the 0.5 s backoff
    await asyncio.sleep(0.2)
    assert len(api.to(POST)) == 2  # one refused, one delivered: no further copy


async def test_permanent_error_on_the_closure_notice_is_recorded_as_failed_and_not_retried(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    def answer(request: RecordedRequest) -> Answer:
        if posted(request)["text"] == BYE:
            return Answer(json_body={"ok": False, "error": "not_in_channel"})
        return POSTED

    api.respond(POST, answer)
    gateway = await start_gateway(make_settings(tmp_path, [slack_endpoint(api.url, minutes=SHORT)]))
    assert (await post(gateway, callback(message("hi"))))[0] == 200
    await api.wait_for(2, POST, timeout_s=5)
    await gateway.settle()
    session = await only_session(gateway, "C1")
    assert session["close_reason"] == "inactivity"
    assert session["notice"].startswith("failed:") and "not_in_channel" in session["notice"]
    await asyncio.sleep(0.6)
    assert len(api.to(POST)) == 2


def retry_gap_s(seen_at: list[float]) -> float:
    return seen_at[1] - seen_at[0]


# -- odd but signed payloads ------------------------------------------------------------------


@pytest.fixture
async def echo_flow_url() -> AsyncIterator[str]:
    """An http flow backend that echoes the event text."""

    async def flow(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response({"replies": [{"text": f"flow: {body['event']['text']}"}]})

    app = web.Application()
    app.router.add_post("/flow", flow)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield str(server.make_url("/flow"))
    await server.close()


@pytest.mark.parametrize("event_ts", ["99999999999999.000100", "nan"], ids=["year-out-of-range", "nan"])
async def test_signed_event_with_an_odd_event_ts_still_opens_a_session_and_reaches_the_http_flow(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, echo_flow_url: str, event_ts: str
) -> None:
    """S16 and "nothing acknowledged is lost": an accepted (200) user message must open a
    session and get its answer even when its platform timestamp cannot be shown as ISO 8601."""
    settings = make_settings(tmp_path, [slack_endpoint(api.url)], flow={"type": "http", "url": echo_flow_url})
    gateway = await start_gateway(settings)
    event = message("odd clock")
    event["event_ts"] = event_ts
    assert (await post(gateway, callback(event)))[0] == 200
    [sent] = await api.wait_for(1, POST, timeout_s=3)
    assert posted(sent)["text"] == "flow: odd clock"
    await gateway.settle()
    assert (await only_session(gateway, "C1"))["message_count"] == 1
