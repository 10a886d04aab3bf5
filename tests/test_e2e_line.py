"""LINE end to end, what only LINE does: real signed HTTP requests to the real app, the
recording fake LINE API on 127.0.0.1, real SQLite, echo flow. Proves reply vs push, groups and
rooms, batches, S16 housekeeping, the reply token's minute and fallback to push, and the retry
key's stability across retries and restarts. The contract every platform keeps (signatures,
bodies, redelivery, closure notices, send retries) is in ``tests/test_webhook_contract.py``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits import Kit
from tests.kits.line import (
    BYE,
    LINE,
    PUSH,
    REPLY,
    body_of,
    housekeeping_event,
    retry_key_of,
    sign,
    text_event,
    texts,
)
from tests.scripted_flow import ScriptedFlow

SHORT = 0.01  # minutes: 0.6 s of silence closes the session


async def post(gateway: Gateway, body: bytes, headers: dict[str, str] | None = None) -> int:
    """POST ``body`` to the webhook, signed unless ``headers`` are given; the status."""
    return (await LINE.post(gateway, body, headers=headers)).status


@pytest.fixture
def kit() -> Kit:
    return LINE


# -- non-text interactions (S16) ---------------------------------------------------------------


async def test_s16_sticker_opens_a_session_but_echo_does_not_answer(gateway: Gateway, api: FakePlatform) -> None:
    event = text_event("unused")
    event["message"] = {"id": "m-st", "type": "sticker", "packageId": "446", "stickerId": "1988", "quoteToken": "q"}
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    session = await LINE.session(gateway, "U1")
    assert session["state"] == "open" and session["message_count"] == 1
    assert api.requests == []


async def test_s16_postback_opens_a_session(gateway: Gateway, api: FakePlatform) -> None:
    event = housekeeping_event("postback", replyToken="rt-pb", postback={"data": "action=buy"})
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    session = await LINE.session(gateway, "U1")
    assert session["state"] == "open" and session["message_count"] == 1


# -- LINE's signature over bytes, its connectivity check ----------------------------------------


async def test_correctly_signed_body_that_is_not_utf8_is_401(
    gateway: Gateway, tmp_path: Path, api: FakePlatform
) -> None:
    """LINE signs text: a body that is not UTF-8 cannot carry a valid signature, even one
    computed over its bytes, and is refused as such before parsing."""
    body = b"\xff\xfe\x00 not utf-8"
    assert await post(gateway, body, headers={"x-line-signature": sign(body)}) == 401
    await LINE.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", "U1")


async def test_empty_events_connectivity_check_is_200(gateway: Gateway, tmp_path: Path, api: FakePlatform) -> None:
    assert await post(gateway, json.dumps({"destination": "Ubot", "events": []}).encode()) == 200
    await LINE.assert_nothing_stored(gateway, api, tmp_path / "gateway.db", "U1")


# -- closure in groups and rooms (S7, S9) ---------------------------------------------------------


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
    gateway = await start_gateway(LINE.settings(tmp_path, api, minutes=SHORT))
    assert await post(gateway, body_of(text_event("hi all", source=source, reply_token="rt-g"))) == 200
    [reply] = await api.wait_for(1, REPLY)
    assert reply.json()["replyToken"] == "rt-g" and texts(reply) == ["hi all"]
    [push] = await api.wait_for(1, PUSH, timeout_s=5)
    await gateway.settle()
    LINE.check_notice(push, conversation, BYE)  # the group, not the user who wrote
    session = await LINE.session(gateway, conversation)
    assert session["contact_id"] == f"ln:{conversation}"
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    assert await LINE.contact(gateway, "U2") is None


# -- batches ----------------------------------------------------------------------------------


async def test_batch_of_three_events_from_two_users_is_all_answered_in_per_user_order(
    gateway: Gateway, api: FakePlatform
) -> None:
    events_in = [
        text_event("a1", user="Ua", reply_token="rt-a1"),
        text_event("b1", user="Ub", reply_token="rt-b1"),
        text_event("a2", user="Ua", reply_token="rt-a2"),
    ]
    assert await post(gateway, body_of(*events_in)) == 200
    replies = await api.wait_for(3, REPLY)
    await gateway.settle()
    assert len(api.requests) == 3
    by_token = {r.json()["replyToken"]: texts(r) for r in replies}
    assert by_token == {"rt-a1": ["a1"], "rt-b1": ["b1"], "rt-a2": ["a2"]}
    user_a = [texts(r)[0] for r in replies if r.json()["replyToken"].startswith("rt-a")]
    assert user_a == ["a1", "a2"]
    assert (await LINE.session(gateway, "Ua"))["message_count"] == 2
    assert (await LINE.session(gateway, "Ub"))["message_count"] == 1


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
    gateway: Gateway, api: FakePlatform, event: dict[str, Any]
) -> None:
    assert await post(gateway, body_of(event)) == 200
    await gateway.settle()
    assert await LINE.contact(gateway, "U1") is None
    assert (await gateway.admin_get("/admin/sessions?endpoint=ln"))["sessions"] == []
    assert api.requests == []
    assert LINE.events(gateway, "ignored") == 1


# -- reply tokens and retry keys ----------------------------------------------------------------


async def test_invalid_reply_token_falls_back_to_push_and_arrives_once(gateway: Gateway, api: FakePlatform) -> None:
    api.fail_next(REPLY, Answer(status=400, json_body={"message": "Invalid reply token"}))
    assert await post(gateway, body_of(text_event("late", user="Ulate"))) == 200
    [push] = await api.wait_for(1, PUSH)
    await gateway.settle()
    assert len(api.to(REPLY)) == 1  # tried once, refused
    LINE.check_notice(push, "Ulate", "late")
    assert len(api.requests) == 2


async def test_push_500_then_200_is_delivered_and_the_retry_carries_the_same_retry_key(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    gateway = await start_gateway(LINE.settings(tmp_path, api, minutes=SHORT))
    api.fail_next(PUSH, LINE.server_error())
    assert await post(gateway, body_of(text_event("hi"))) == 200
    first, retry = await api.wait_for(2, PUSH, timeout_s=6)
    await gateway.settle()
    assert texts(first) == texts(retry) == [BYE]
    assert retry_key_of(first) == retry_key_of(retry)
    session = await LINE.session(gateway, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"
    assert len(api.to(PUSH)) == 2


async def test_push_409_retry_key_already_accepted_counts_as_delivered(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """The 500 was a lie (LINE did accept the push): the retry's 409 means delivered, not failed."""
    gateway = await start_gateway(LINE.settings(tmp_path, api, minutes=SHORT))
    api.fail_next(
        PUSH,
        LINE.server_error(),
        Answer(status=409, json_body={"message": "The retry key is already accepted"}),
    )
    assert await post(gateway, body_of(text_event("hi"))) == 200
    first, retry = await api.wait_for(2, PUSH, timeout_s=6)
    await gateway.settle()
    assert retry_key_of(first) == retry_key_of(retry)
    session = await LINE.session(gateway, "U1")
    assert session["notice"] == "sent"
    assert len(api.to(PUSH)) == 2


async def test_reply_that_got_through_despite_a_500_is_not_sent_again(gateway: Gateway, api: FakePlatform) -> None:
    """The 500 came after LINE used the token: the retry's "Invalid reply token" for a fresh
    token of ours means the first attempt was delivered, so nothing is pushed (no duplicate)."""
    api.fail_next(
        REPLY,
        LINE.server_error(),
        Answer(status=400, json_body={"message": "Invalid reply token"}),
    )
    assert await post(gateway, body_of(text_event("once"))) == 200
    await api.wait_for(2, REPLY, timeout_s=6)
    await gateway.settle()
    assert api.to(PUSH) == []
    assert LINE.messages_out(gateway, "sent") == 1


async def test_reply_held_past_the_reply_token_minute_goes_by_push(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """A reply token works about one minute: a reply produced later is pushed, never replied
    with a dead token (the gateway's clock is moved 60 s while the flow holds the event)."""
    offset_s = [0.0]
    flow = ScriptedFlow()
    flow.gate = asyncio.Event()
    gateway = await start_gateway(LINE.settings(tmp_path, api), clock=lambda: time.time() + offset_s[0], flow=flow)
    assert await post(gateway, body_of(text_event("slow", reply_token="rt-slow"))) == 200
    await asyncio.wait_for(flow.entered.wait(), 5)
    offset_s[0] = 60.0
    flow.gate.set()
    [push] = await api.wait_for(1, PUSH)
    await gateway.settle()
    assert api.to(REPLY) == []
    LINE.check_notice(push, "U1", "slow")


async def test_closure_push_retried_after_a_restart_carries_the_same_retry_key(
    tmp_path: Path, start_gateway: Any, api: FakePlatform
) -> None:
    """LINE keeps a retry key 24 h: every attempt of one push carries the same key, also one
    cut off in flight by a stop and the next process's retry on the same database, so LINE
    can drop a push it already delivered."""
    keys_seen: list[str | None] = []  # every push attempt as it arrives, cut off or not
    pushed = asyncio.Event()

    def answer(request: RecordedRequest) -> Answer:
        keys_seen.append(request.headers.get("X-Line-Retry-Key"))
        if len(keys_seen) == 1:
            return Answer(status=503, json_body={"message": "unavailable"})
        if len(keys_seen) == 2:  # hangs until the gateway stops and cuts it off
            pushed.set()
            return Answer(status=503, json_body={"message": "unavailable"}, delay_s=5.0)
        return LINE.sent()

    api.respond(PUSH, answer)
    settings = LINE.settings(tmp_path, api, minutes=SHORT)
    gateway = await start_gateway(settings)
    assert await post(gateway, body_of(text_event("hi"))) == 200
    await api.wait_for(1, PUSH, timeout_s=5)
    await asyncio.wait_for(pushed.wait(), 5)  # the retry is with LINE (hanging) before the gateway stops
    await gateway.client.close()  # waits 2 s for the hanging retry, then cancels it
    assert len(keys_seen) == 2 and len(api.to(PUSH)) == 1

    restarted = await start_gateway(settings)
    first, delivered = await api.wait_for(2, PUSH, timeout_s=10)
    await restarted.settle()
    assert len(keys_seen) == 3
    assert keys_seen[0] is not None and len(set(keys_seen)) == 1
    assert retry_key_of(first) == retry_key_of(delivered) == keys_seen[0]
    LINE.check_notice(delivered, "U1", BYE)
    session = await LINE.session(restarted, "U1")
    assert session["close_reason"] == "inactivity" and session["notice"] == "sent"


# -- odd but signed payloads ------------------------------------------------------------------


async def test_signed_event_with_an_out_of_range_timestamp_still_reaches_the_http_flow(
    tmp_path: Path, start_gateway: Any, api: FakePlatform, echo_flow_url: str
) -> None:
    """An accepted (200) user message must open a session and get its answer even when its
    platform timestamp cannot be shown as ISO 8601 ("nothing acknowledged is lost")."""
    gateway = await start_gateway(LINE.settings(tmp_path, api, flow={"type": "http", "url": echo_flow_url}))
    event = text_event("odd clock")
    event["timestamp"] = 10**20
    assert await post(gateway, body_of(event)) == 200
    [reply] = await api.wait_for(1, REPLY, timeout_s=3)
    assert texts(reply) == ["flow: odd clock"]
    await gateway.settle()
    assert (await LINE.session(gateway, "U1"))["message_count"] == 1
