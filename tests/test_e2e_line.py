"""LINE end to end: real signed HTTP requests to the real app, the recording fake LINE API on
127.0.0.1, real SQLite. Echo flow. Proves reply vs push, signatures, dedup of redeliveries
(also across a restart), the S7/S9 closure push to the same user or group, batches, S16
housekeeping, the reply-token fallback and the retry key's stability across retries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
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

from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.scripted_flow import ScriptedFlow
from tests.signed import post_raw

SECRET = "e2e-line-channel-secret"
TOKEN = "e2e-line-access-token"
REPLY = "/v2/bot/message/reply"
PUSH = "/v2/bot/message/push"
SENT = Answer(json_body={"sentMessages": [{"id": "461230966842064897", "quoteToken": "q"}]})
LONG = 30.0  # minutes: no closure during the test
SHORT = 0.01  # minutes: 0.6 s of silence closes the session
BYE = "bye"


# -- helpers ----------------------------------------------------------------------------------


def line_endpoint(api_url: str, *, name: str = "ln", minutes: float = LONG) -> dict[str, Any]:
    return {
        "name": name,
        "channel": "line",
        "api_base_url": api_url,
        "credentials": {"channel_secret": SECRET, "channel_access_token": TOKEN},
        "session": {"expiration_minutes": minutes, "on_close": {"messages": [BYE]}},
    }


def sign(body: bytes, secret: str = SECRET) -> str:
    """As LINE signs: Base64(HMAC-SHA256(channel secret, raw body))."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def text_event(
    text: str,
    *,
    user: str = "U1",
    event_id: str | None = None,
    reply_token: str | None = None,
    source: dict[str, Any] | None = None,
    redelivery: bool = False,
    mode: str = "active",
) -> dict[str, Any]:
    event_id = event_id or f"01E2E{uuid.uuid4().hex[:20].upper()}"
    return {
        "type": "message",
        "mode": mode,
        "timestamp": int(time.time() * 1000),
        "source": source or {"type": "user", "userId": user},
        "webhookEventId": event_id,
        "deliveryContext": {"isRedelivery": redelivery},
        "replyToken": reply_token or f"rt-{event_id}",
        "message": {"id": f"m-{event_id}", "type": "text", "text": text, "quoteToken": f"q-{event_id}"},
    }


def housekeeping_event(kind: str, *, user: str = "U1", **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "mode": "active",
        "timestamp": int(time.time() * 1000),
        "source": {"type": "user", "userId": user},
        "webhookEventId": f"01HK{uuid.uuid4().hex[:20].upper()}",
        "deliveryContext": {"isRedelivery": False},
        **fields,
    }


def body_of(*events: dict[str, Any]) -> bytes:
    return json.dumps({"destination": "Ubot", "events": list(events)}).encode()


async def post(gateway: Gateway, body: bytes, *, signature: str | None = "sign", endpoint: str = "ln") -> int:
    """POST ``body`` to the webhook; ``signature="sign"`` signs it correctly, None sends none."""
    headers = {"Content-Type": "application/json"}
    if signature == "sign":
        headers["x-line-signature"] = sign(body)
    elif signature is not None:
        headers["x-line-signature"] = signature
    response = await gateway.client.post(f"/webhooks/{endpoint}", data=body, headers=headers)
    await response.read()
    return response.status


async def contact(gateway: Gateway, conversation: str, endpoint: str = "ln") -> dict[str, Any] | None:
    response = await gateway.client.get(f"/admin/contacts/{endpoint}:{conversation}", headers=gateway.admin_headers())
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


def inbound_rows(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM inbound").fetchone()[0])


async def assert_nothing_stored(gateway: Gateway, tmp_path: Path, api: FakePlatform) -> None:
    await gateway.settle()
    assert await contact(gateway, "U1") is None
    listed = await gateway.admin_get("/admin/sessions?endpoint=ln")
    assert listed["sessions"] == []
    assert inbound_rows(tmp_path) == 0
    assert api.requests == []


def texts(request: RecordedRequest) -> list[str]:
    return [m["text"] for m in request.json()["messages"]]


def assert_retry_key(request: RecordedRequest) -> str:
    key = request.headers.get("X-Line-Retry-Key")
    assert key is not None, "push without X-Line-Retry-Key"
    uuid.UUID(key)  # LINE requires a UUID
    return key


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as fake:
        fake.respond(REPLY, SENT)
        fake.respond(PUSH, SENT)
        yield fake


# -- text in, echo out ------------------------------------------------------------------------


async def test_text_is_echoed_by_reply_with_the_reply_token_and_bearer(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    assert await post(gateway, body_of(text_event("hello", reply_token="rt-fresh"))) == 200
    [reply] = await api.wait_for(1, REPLY)
    await gateway.settle()
    assert reply.method == "POST"
    assert reply.headers["Authorization"] == f"Bearer {TOKEN}"
    assert reply.json()["replyToken"] == "rt-fresh"
    assert reply.json()["messages"] == [{"type": "text", "text": "hello"}]
    assert "X-Line-Retry-Key" not in reply.headers  # reply takes no retry key
    assert api.to(PUSH) == []  # a fresh token replies: no push quota spent
    session = await only_session(gateway, "U1")
    assert (session["channel"], session["conversation"], session["contact_id"]) == ("line", "U1", "ln:U1")
    assert session["state"] == "open" and session["message_count"] == 1 and session["interactive"] is True


async def test_s16_sticker_opens_a_session_but_echo_does_not_answer(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    event = text_event("unused")
    event["message"] = {"id": "m-st", "type": "sticker", "packageId": "446", "stickerId": "1988", "quoteToken": "q"}
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    session = await only_session(gateway, "U1")
    assert session["state"] == "open" and session["message_count"] == 1
    assert api.requests == []


async def test_s16_postback_opens_a_session(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    event = housekeeping_event("postback", replyToken="rt-pb", postback={"data": "action=buy"})
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    session = await only_session(gateway, "U1")
    assert session["state"] == "open" and session["message_count"] == 1


# -- signatures, bodies, sizes, handshake -----------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "bm90IGEgc2lnbmF0dXJl",
        "not base64 at all!",
        sign(b"some other body"),
        "forged-with-other-secret",
    ],
    ids=["missing", "empty", "wrong", "garbage", "other-body", "other-secret"],
)
async def test_forged_or_missing_signature_is_401_and_stores_nothing(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    body = body_of(text_event("hello"))
    if signature == "forged-with-other-secret":
        signature = sign(body, "not-the-channel-secret")
    assert await post(gateway, body, signature=signature) == 401
    await assert_nothing_stored(gateway, tmp_path, api)


async def test_signature_is_checked_before_the_body_is_parsed(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    assert await post(gateway, b"{not json", signature=None) == 401
    assert await post(gateway, b"\xff\xfe\x00 not utf-8", signature=sign(b"\xff\xfe\x00 not utf-8")) == 401
    await assert_nothing_stored(gateway, tmp_path, api)


@pytest.mark.parametrize("raw_signature", [b"\xc3\xa9" * 22, b"\xff\xfe" * 22], ids=["utf8-e-acute", "not-utf8"])
async def test_non_ascii_signature_header_is_401_not_500(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, raw_signature: bytes
) -> None:
    """Bad input never becomes a 5xx: a signature header with non-ASCII bytes (sent on a raw
    socket, as any client on the internet can) is rejected like any wrong signature."""
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    body = body_of(text_event("hello"))
    server = gateway.client.server
    headers = [b"x-line-signature: " + raw_signature]
    status_line = await post_raw(str(server.host), int(server.port or 0), "/webhooks/ln", headers, body)
    assert status_line.split()[1] == b"401", status_line
    await assert_nothing_stored(gateway, tmp_path, api)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'"events"', b"{}", b'{"events": {}}', b'{"events": null}', b"", b"[" * 100_000],
    ids=["not-json", "array", "string", "no-events", "events-object", "events-null", "empty", "deeply-nested"],
)
async def test_signed_malformed_body_is_400(tmp_path: Path, start_gateway: Any, api: FakePlatform, body: bytes) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    assert await post(gateway, body) == 400
    await assert_nothing_stored(gateway, tmp_path, api)


@pytest.mark.parametrize("signature", [None, "sign"], ids=["unsigned", "signed"])
async def test_oversized_body_is_413_whatever_its_signature(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, signature: str | None
) -> None:
    settings = make_settings(tmp_path, [line_endpoint(api.url)], server={"max_body_bytes": 1024})
    gateway = await start_gateway(settings)
    body = body_of(text_event("x" * 2000))
    assert len(body) > 1024
    assert await post(gateway, body, signature=signature) == 413
    await assert_nothing_stored(gateway, tmp_path, api)
    # A body under the limit still goes through.
    assert await post(gateway, body_of(text_event("small"))) == 200
    await api.wait_for(1, REPLY)


async def test_get_on_the_webhook_is_400_not_5xx(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    response = await gateway.client.get("/webhooks/ln")
    assert response.status == 400
    await assert_nothing_stored(gateway, tmp_path, api)


async def test_empty_events_connectivity_check_is_200(tmp_path: Path, start_gateway: Any, api: FakePlatform) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    assert await post(gateway, json.dumps({"destination": "Ubot", "events": []}).encode()) == 200
    await assert_nothing_stored(gateway, tmp_path, api)


# -- redelivery -------------------------------------------------------------------------------


@pytest.mark.parametrize("together", [False, True], ids=["after", "concurrent"])
async def test_redelivery_of_the_same_webhook_event_id_gets_one_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, together: bool
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    first = text_event("once", event_id="01REDELIVER0000000000001", reply_token="rt-1")
    again = {**first, "deliveryContext": {"isRedelivery": True}, "replyToken": "rt-2"}
    if together:
        statuses = await asyncio.gather(post(gateway, body_of(first)), post(gateway, body_of(again)))
        assert list(statuses) == [200, 200]
    else:
        assert await post(gateway, body_of(first)) == 200
        await api.wait_for(1, REPLY)
        assert await post(gateway, body_of(again)) == 200
    await gateway.settle()
    assert len(api.requests) == 1
    assert texts(api.requests[0]) == ["once"]
    assert (await only_session(gateway, "U1"))["message_count"] == 1
    assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="duplicate") == 1


async def test_redelivery_after_a_restart_on_the_same_database_gets_no_second_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    settings = make_settings(tmp_path, [line_endpoint(api.url)])
    gateway = await start_gateway(settings)
    event = text_event("before restart", event_id="01RESTART000000000000001")
    assert await post(gateway, body_of(event)) == 200
    await api.wait_for(1, REPLY)
    await gateway.settle()
    await gateway.client.close()

    restarted = await start_gateway(settings)
    redelivered = {**event, "deliveryContext": {"isRedelivery": True}, "replyToken": "rt-late"}
    assert await post(restarted, body_of(redelivered)) == 200
    await restarted.settle()
    assert len(api.requests) == 1
    session = await only_session(restarted, "U1")
    assert session["state"] == "open" and session["message_count"] == 1
    # The restarted gateway still answers new events.
    assert await post(restarted, body_of(text_event("after restart"))) == 200
    await api.wait_for(2, REPLY)
    assert texts(api.to(REPLY)[1]) == ["after restart"]


# -- closure (S7, S9) -------------------------------------------------------------------------


async def test_s7_s9_closure_notice_is_pushed_once_to_the_user_with_a_retry_key(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url, minutes=SHORT)]))
    first = text_event("hi", user="Uclose")
    assert await post(gateway, body_of(first)) == 200
    await api.wait_for(1, REPLY)
    [push] = await api.wait_for(1, PUSH, timeout_s=5)
    await gateway.settle()
    assert push.headers["Authorization"] == f"Bearer {TOKEN}"
    assert push.json()["to"] == "Uclose"
    assert texts(push) == [BYE]
    assert_retry_key(push)
    found = await contact(gateway, "Uclose")
    assert found is not None
    [session] = found["conversations"]
    assert session["state"] == "closed"
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    # A late redelivery of the closed session's event reopens nothing and answers nothing.
    assert await post(gateway, body_of({**first, "deliveryContext": {"isRedelivery": True}})) == 200
    await gateway.settle()
    # Exactly once: no second notice after another expiration period.
    await asyncio.sleep(0.8)
    assert len(api.to(PUSH)) == 1 and len(api.to(REPLY)) == 1
    found = await contact(gateway, "Uclose")
    assert found is not None and len(found["conversations"]) == 1


@pytest.mark.parametrize(
    ("source", "conversation"),
    [
        ({"type": "group", "groupId": "Cgroup1", "userId": "U2"}, "Cgroup1"),
        ({"type": "room", "roomId": "Rroom1", "userId": "U2"}, "Rroom1"),
    ],
    ids=["group", "room"],
)
async def test_s7_group_message_is_replied_and_the_closure_is_pushed_to_the_group(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, source: dict[str, Any], conversation: str
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url, minutes=SHORT)]))
    assert await post(gateway, body_of(text_event("hi all", source=source, reply_token="rt-g"))) == 200
    [reply] = await api.wait_for(1, REPLY)
    assert reply.json()["replyToken"] == "rt-g" and texts(reply) == ["hi all"]
    [push] = await api.wait_for(1, PUSH, timeout_s=5)
    await gateway.settle()
    assert push.json()["to"] == conversation  # the group, not the user who wrote
    assert texts(push) == [BYE]
    assert_retry_key(push)
    session = await only_session(gateway, conversation)
    assert session["contact_id"] == f"ln:{conversation}"
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    assert await contact(gateway, "U2") is None


# -- batches ----------------------------------------------------------------------------------


async def test_batch_of_three_events_from_two_users_is_all_answered_in_per_user_order(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    events = [
        text_event("a1", user="Ua", reply_token="rt-a1"),
        text_event("b1", user="Ub", reply_token="rt-b1"),
        text_event("a2", user="Ua", reply_token="rt-a2"),
    ]
    assert await post(gateway, body_of(*events)) == 200
    replies = await api.wait_for(3, REPLY)
    await gateway.settle()
    assert len(api.requests) == 3
    by_token = {r.json()["replyToken"]: texts(r) for r in replies}
    assert by_token == {"rt-a1": ["a1"], "rt-b1": ["b1"], "rt-a2": ["a2"]}
    user_a = [texts(r)[0] for r in replies if r.json()["replyToken"].startswith("rt-a")]
    assert user_a == ["a1", "a2"]
    assert (await only_session(gateway, "Ua"))["message_count"] == 2
    assert (await only_session(gateway, "Ub"))["message_count"] == 1


# -- housekeeping (S16) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        text_event("not ours to answer", mode="standby"),
        housekeeping_event("follow", replyToken="rt-follow", follow={"isUnblocked": False}),
        housekeeping_event("unfollow"),
    ],
    ids=["standby", "follow", "unfollow"],
)
async def test_s16_standby_follow_and_unfollow_are_200_without_session_or_reply(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, event: dict[str, Any]
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    assert await contact(gateway, "U1") is None
    assert (await gateway.admin_get("/admin/sessions?endpoint=ln"))["sessions"] == []
    assert api.requests == []
    assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="ignored") == 1


# -- delivery failures ------------------------------------------------------------------------


async def test_invalid_reply_token_falls_back_to_push_and_arrives_once(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    api.fail_next(REPLY, Answer(status=400, json_body={"message": "Invalid reply token"}))
    assert await post(gateway, body_of(text_event("late", user="Ulate"))) == 200
    [push] = await api.wait_for(1, PUSH)
    await gateway.settle()
    assert len(api.to(REPLY)) == 1  # tried once, refused
    assert push.json()["to"] == "Ulate" and texts(push) == ["late"]
    assert_retry_key(push)
    assert len(api.requests) == 2


async def test_push_500_then_200_is_delivered_and_the_retry_carries_the_same_retry_key(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url, minutes=SHORT)]))
    api.fail_next(PUSH, Answer(status=500, json_body={"message": "internal error"}))
    assert await post(gateway, body_of(text_event("hi"))) == 200
    first, retry = await api.wait_for(2, PUSH, timeout_s=6)
    await gateway.settle()
    assert texts(first) == texts(retry) == [BYE]
    assert assert_retry_key(first) == assert_retry_key(retry)
    session = await only_session(gateway, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    assert len(api.to(PUSH)) == 2


async def test_push_409_retry_key_already_accepted_counts_as_delivered(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The 500 was a lie (LINE did accept the push): the retry's 409 means delivered, not failed."""
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url, minutes=SHORT)]))
    api.fail_next(
        PUSH,
        Answer(status=500, json_body={"message": "internal error"}),
        Answer(status=409, json_body={"message": "The retry key is already accepted"}),
    )
    assert await post(gateway, body_of(text_event("hi"))) == 200
    first, retry = await api.wait_for(2, PUSH, timeout_s=6)
    await gateway.settle()
    assert assert_retry_key(first) == assert_retry_key(retry)
    session = await only_session(gateway, "U1")
    assert session["notice"] == "sent"
    assert len(api.to(PUSH)) == 2


async def test_reply_500_is_retried_with_the_same_token_while_it_is_fresh(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The 500 did not deliver: the retry replies with the same token, once, and no push."""
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    api.fail_next(REPLY, Answer(status=500, json_body={"message": "internal error"}))
    assert await post(gateway, body_of(text_event("again"))) == 200
    await api.wait_for(2, REPLY, timeout_s=6)
    await gateway.settle()
    first, second = api.to(REPLY)
    assert first.json()["replyToken"] == second.json()["replyToken"] and texts(second) == ["again"]
    assert api.to(PUSH) == []


async def test_reply_that_got_through_despite_a_500_is_not_sent_again(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The 500 came after LINE used the token: the retry's "Invalid reply token" for a fresh
    token of ours means the first attempt was delivered, so nothing is pushed (no duplicate)."""
    gateway = await start_gateway(make_settings(tmp_path, [line_endpoint(api.url)]))
    api.fail_next(
        REPLY,
        Answer(status=500, json_body={"message": "internal error"}),
        Answer(status=400, json_body={"message": "Invalid reply token"}),
    )
    assert await post(gateway, body_of(text_event("once"))) == 200
    await api.wait_for(2, REPLY, timeout_s=6)
    await gateway.settle()
    assert api.to(PUSH) == []
    assert gateway.metrics.value("gateway_messages_out_total", endpoint="ln", outcome="sent") == 1


async def test_reply_held_past_the_reply_token_minute_goes_by_push(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """A reply token works about one minute: a reply produced later is pushed, never replied
    with a dead token (the gateway's clock is moved 60 s while the flow holds the event)."""
    offset_s = [0.0]
    flow = ScriptedFlow()
    flow.gate = asyncio.Event()
    gateway = await start_gateway(
        make_settings(tmp_path, [line_endpoint(api.url)]), clock=lambda: time.time() + offset_s[0], flow=flow
    )
    assert await post(gateway, body_of(text_event("slow", reply_token="rt-slow"))) == 200
    await asyncio.wait_for(flow.entered.wait(), 5)
    offset_s[0] = 60.0
    flow.gate.set()
    [push] = await api.wait_for(1, PUSH)
    await gateway.settle()
    assert api.to(REPLY) == []
    assert push.json()["to"] == "U1" and texts(push) == ["slow"]
    assert_retry_key(push)


async def test_closure_push_retried_after_a_restart_carries_the_same_retry_key(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """LINE keeps a retry key 24 h: every attempt of one push carries the same key, also one
    cut off in flight by a stop and the next process's retry on the same database, so LINE
    can drop a push it already delivered."""
    keys_seen: list[str | None] = []  # every push attempt as it arrives, cut off or not

    def answer(request: RecordedRequest) -> Answer:
        keys_seen.append(request.headers.get("X-Line-Retry-Key"))
        if len(keys_seen) == 1:
            return Answer(status=503, json_body={"message": "unavailable"})
        if len(keys_seen) == 2:  # hangs until the gateway stops and cuts it off
            return Answer(status=503, json_body={"message": "unavailable"}, delay_s=5.0)
        return SENT

    api.respond(PUSH, answer)
    settings = make_settings(tmp_path, [line_endpoint(api.url, minutes=SHORT)])
    gateway = await start_gateway(settings)
    assert await post(gateway, body_of(text_event("hi"))) == 200
    await api.wait_for(1, PUSH, timeout_s=5)
    while len(keys_seen) < 2:  # the retry is with LINE (hanging) before the gateway stops
        await asyncio.sleep(0.01)
    await gateway.client.close()  # waits 2 s for the hanging retry, then cancels it
    assert len(keys_seen) == 2 and len(api.to(PUSH)) == 1

    restarted = await start_gateway(settings)
    first, delivered = await api.wait_for(2, PUSH, timeout_s=10)
    await restarted.settle()
    assert len(keys_seen) == 3
    assert keys_seen[0] is not None and len(set(keys_seen)) == 1
    assert assert_retry_key(first) == assert_retry_key(delivered) == keys_seen[0]
    assert texts(delivered) == [BYE] and delivered.json()["to"] == "U1"
    session = await only_session(restarted, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"


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


async def test_signed_event_with_an_out_of_range_timestamp_still_reaches_the_http_flow(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, echo_flow_url: str
) -> None:
    """An accepted (200) user message must open a session and get its answer even when its
    platform timestamp cannot be shown as ISO 8601 ("nothing acknowledged is lost")."""
    settings = make_settings(tmp_path, [line_endpoint(api.url)], flow={"type": "http", "url": echo_flow_url})
    gateway = await start_gateway(settings)
    event = text_event("odd clock")
    event["timestamp"] = 10**20
    assert await post(gateway, body_of(event)) == 200
    [reply] = await api.wait_for(1, REPLY, timeout_s=3)
    assert texts(reply) == ["flow: odd clock"]
    await gateway.settle()
    assert (await only_session(gateway, "U1"))["message_count"] == 1
