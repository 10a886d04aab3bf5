"""LINE adapter: signed webhooks (signed as LINE signs them), tolerant parsing, reply vs push,
retry keys and error mapping against the recording fake platform on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from channels.base import WebhookRequest
from channels.line import (
    RETRY_KEY_NAMESPACE,
    LineAdapter,
    classify_error,
    error_message,
    is_invalid_reply_token,
    retry_key,
)
from channels.line_parse import REPLY_TOKEN_TTL_S, conversation_of, dedup_key_of, is_interaction, is_user_message
from channels.registry import Channel
from gateway.errors import BadPayload, BadSignature, DeliveryError, DeliverySkipped
from gateway.models import EventKind, MessageKind, OutboundMessage
from gateway.settings import EndpointSettings, Secret
from tests.fakeplatform import Answer, FakePlatform
from tests.outbound import outbound_message

SECRET = "line-channel-secret"
TOKEN = "line-access-token-xyz"
REPLY = "/v2/bot/message/reply"
PUSH = "/v2/bot/message/push"
SENT = Answer(json_body={"sentMessages": [{"id": "461230966842064897", "quoteToken": "q"}]})


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoint(api_base_url: str | None = None, secret: str = SECRET) -> EndpointSettings:
    return EndpointSettings(
        name="line-main",
        channel=Channel.LINE,
        path="/webhooks/line-main",
        api_base_url=api_base_url,
        credentials={"channel_secret": Secret(secret), "channel_access_token": Secret(TOKEN)},
    )


def sign(body: bytes, secret: str = SECRET) -> str:
    """As LINE does: Base64(HMAC-SHA256(channel secret, raw body))."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def webhook(
    payload: Any, *, signature: str | None = None, header: str = "X-Line-Signature", sign_it: bool = True
) -> WebhookRequest:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
    if signature is not None:
        headers[header] = signature
    elif sign_it:
        headers[header] = sign(body)
    return WebhookRequest(
        method="POST",
        path="/webhooks/line-main",
        query={},
        public_url="https://bots.example.com/webhooks/line-main",
        headers=CIMultiDictProxy(headers),
        body=body,
        content_type="application/json",
    )


def text_event(
    text: str = "hello", *, user: str = "U1", event_id: str = "01HEVENT1", message_id: str = "m1", **extra: Any
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "message",
        "mode": "active",
        "timestamp": 1_700_000_000_123,
        "source": {"type": "user", "userId": user},
        "webhookEventId": event_id,
        "deliveryContext": {"isRedelivery": False},
        "replyToken": "reply-token-1",
        "message": {"id": message_id, "type": "text", "text": text, "quoteToken": "qt-1"},
    }
    event.update(extra)
    return event


def payload(*events: dict[str, Any]) -> dict[str, Any]:
    return {"destination": "Ubot", "events": list(events)}


def outbound(
    *,
    text: str = "hi there",
    conversation: str = "U1",
    expires_at: float | None = None,
    created_at: float = 1_700_000_000.0,  # the Clock's default now: created by this process
    **fields: Any,  # kind, key, reply_token, attempts
) -> OutboundMessage:
    return outbound_message(
        "line-main", "line", conversation, text, created_at=created_at, reply_token_expires_at=expires_at, **fields
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def parser(clock: Clock) -> LineAdapter:
    return LineAdapter(endpoint(), clock=clock)


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as fake:
        fake.respond(REPLY, SENT)
        fake.respond(PUSH, SENT)
        yield fake


@pytest.fixture
async def adapter(api: FakePlatform, clock: Clock) -> AsyncIterator[LineAdapter]:
    line = LineAdapter(endpoint(api.url), clock=clock, request_timeout_s=2.0)
    async with aiohttp.ClientSession() as http:
        await line.start(http)
        yield line
        await line.aclose()


# -- signature ------------------------------------------------------------------------------


def test_signed_request_is_accepted_under_any_header_case(parser: LineAdapter) -> None:
    for header in ("X-Line-Signature", "x-line-signature", "X-LINE-SIGNATURE"):
        parsed = parser.parse_webhook(webhook(payload(text_event()), header=header))
        assert len(parsed.events) == 1


@pytest.mark.parametrize(
    "request_",
    [
        webhook(payload(text_event()), sign_it=False),
        webhook(payload(text_event()), signature=""),
        webhook(payload(text_event()), signature="bm90IGEgc2lnbmF0dXJl"),
        webhook(payload(text_event()), signature=sign(b"another body")),
        webhook(b"\xff\xfe not utf-8", signature=sign(b"\xff\xfe not utf-8")),
        webhook(b"not json", signature="\udcff"),  # a header aiohttp decoded with surrogateescape
    ],
    ids=["missing", "empty", "wrong", "other-body", "not-utf8", "undecodable-header"],
)
def test_missing_or_wrong_signature_is_rejected(parser: LineAdapter, request_: WebhookRequest) -> None:
    with pytest.raises(BadSignature):
        parser.parse_webhook(request_)


def test_signature_with_another_secret_is_rejected(clock: Clock) -> None:
    body = json.dumps(payload(text_event())).encode()
    with pytest.raises(BadSignature):
        LineAdapter(endpoint(), clock=clock).parse_webhook(webhook(body, signature=sign(body, "other-secret")))


def test_signature_is_checked_before_the_body(parser: LineAdapter) -> None:
    with pytest.raises(BadSignature):
        parser.parse_webhook(webhook(b"not json at all", sign_it=False))


def test_no_channel_secret_rejects_everything(clock: Clock) -> None:
    body = json.dumps(payload(text_event())).encode()
    with pytest.raises(BadSignature):
        LineAdapter(endpoint(secret=""), clock=clock).parse_webhook(webhook(body, signature=sign(body, "")))


# -- payload shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"events"', b"{}", b'{"events": {}}', b'{"events": null}', b""],
    ids=["not-json", "array", "string", "no-events", "events-object", "events-null", "empty"],
)
def test_malformed_body_is_bad_payload(parser: LineAdapter, body: bytes) -> None:
    with pytest.raises(BadPayload):
        parser.parse_webhook(webhook(body))


def test_empty_events_is_a_connectivity_check(parser: LineAdapter) -> None:
    parsed = parser.parse_webhook(webhook({"destination": "Ubot", "events": []}))
    assert parsed.events == []
    assert parsed.ignored == 0
    assert (parsed.response.status, parsed.response.text) == (200, "")


def test_handshake_is_not_supported(parser: LineAdapter) -> None:
    with pytest.raises(BadPayload):
        parser.handshake(webhook(b"", sign_it=False))


# -- events ---------------------------------------------------------------------------------


def test_text_message_becomes_an_inbound_event(parser: LineAdapter, clock: Clock) -> None:
    [event] = parser.parse_webhook(webhook(payload(text_event("hello")))).events
    assert event.kind is EventKind.MESSAGE
    assert event.conversation == "U1"
    assert event.text == "hello"
    assert event.attachments == ()
    assert event.dedup_key == "01HEVENT1"
    assert event.message_id == "m1"
    assert event.timestamp == pytest.approx(1_700_000_000.123)
    assert event.reply_token == "reply-token-1"
    assert event.reply_token_expires_at == clock.now + REPLY_TOKEN_TTL_S
    assert event.is_interaction


def test_batch_of_three_events_keeps_order(parser: LineAdapter) -> None:
    sticker = text_event(event_id="E2", message_id="m2")
    sticker["message"] = {"id": "m2", "type": "sticker", "packageId": "446", "stickerId": "1988"}
    postback = {
        "type": "postback",
        "mode": "active",
        "timestamp": 1_700_000_001_000,
        "source": {"type": "user", "userId": "U3"},
        "webhookEventId": "E3",
        "deliveryContext": {"isRedelivery": False},
        "replyToken": "reply-token-3",
        "postback": {"data": "action=buy&item=1", "params": {"date": "2024-01-01"}},
    }
    parsed = parser.parse_webhook(webhook(payload(text_event(event_id="E1"), sticker, postback)))
    assert [e.dedup_key for e in parsed.events] == ["E1", "E2", "E3"]
    assert [e.kind for e in parsed.events] == [EventKind.MESSAGE, EventKind.MESSAGE, EventKind.POSTBACK]
    assert parsed.events[2].text == "action=buy&item=1"
    assert parsed.events[2].conversation == "U3"
    assert parsed.events[2].message_id is None
    assert parsed.events[2].attachments == (
        {"type": "postback", "data": "action=buy&item=1", "params": {"date": "2024-01-01"}},
    )
    assert parsed.ignored == 0


@pytest.mark.parametrize(
    ("source", "conversation"),
    [
        ({"type": "user", "userId": "U1"}, "U1"),
        ({"type": "group", "groupId": "Cgroup", "userId": "U1"}, "Cgroup"),
        ({"type": "room", "roomId": "Rroom", "userId": "U1"}, "Rroom"),
        ({"type": "group", "groupId": "Cgroup"}, "Cgroup"),  # a member without consent: no userId
        ({"type": "group", "userId": "U1"}, None),
        ({"type": "user"}, None),
        ({"type": "user", "userId": ""}, None),
        ({"userId": "U1"}, "U1"),
        ("U1", None),
        (None, None),
    ],
)
def test_conversation_of(source: Any, conversation: str | None) -> None:
    assert conversation_of(source) == conversation


def test_group_and_room_messages_belong_to_the_group_or_room(parser: LineAdapter) -> None:
    group = text_event(event_id="G", source={"type": "group", "groupId": "Cg", "userId": "U1"})
    room = text_event(event_id="R", source={"type": "room", "roomId": "Rr", "userId": "U2"})
    parsed = parser.parse_webhook(webhook(payload(group, room)))
    assert [e.conversation for e in parsed.events] == ["Cg", "Rr"]


STANDBY = text_event(mode="standby")
FOLLOW = {"type": "follow", "mode": "active", "source": {"type": "user", "userId": "U1"}, "replyToken": "r"}
UNFOLLOW = {"type": "unfollow", "mode": "active", "source": {"type": "user", "userId": "U1"}}
JOIN = {"type": "join", "mode": "active", "source": {"type": "group", "groupId": "Cg"}, "replyToken": "r"}
LEAVE = {"type": "leave", "mode": "active", "source": {"type": "group", "groupId": "Cg"}}
UNSEND = {"type": "unsend", "mode": "active", "source": {"type": "user", "userId": "U1"}, "unsend": {"messageId": "1"}}
READ = {"type": "delivery", "mode": "active", "delivery": {"data": "x"}}
STANDBY_POSTBACK = {
    "type": "postback",
    "mode": "standby",
    "source": {"type": "user", "userId": "U1"},
    "postback": {"data": "d"},
}


@pytest.mark.parametrize(
    ("event", "user_message", "interaction"),
    [
        (text_event(), True, True),
        ({"type": "message", "message": {"type": "text", "text": "x"}}, True, True),
        (STANDBY, False, False),
        (STANDBY_POSTBACK, False, False),
        ({"type": "postback", "postback": {"data": "d"}}, False, True),
        (FOLLOW, False, False),
        (UNFOLLOW, False, False),
        (JOIN, False, False),
        (LEAVE, False, False),
        (UNSEND, False, False),
        (READ, False, False),
        ({"type": "message"}, False, False),
        ({"type": "brand-new-kind", "message": {"type": "text"}}, False, False),
    ],
)
def test_predicates(event: dict[str, Any], user_message: bool, interaction: bool) -> None:
    assert is_user_message(event) is user_message
    assert is_interaction(event) is interaction


def test_housekeeping_is_ignored_and_counted(parser: LineAdapter) -> None:
    no_source = text_event(event_id="nosource")
    del no_source["source"]
    events = [STANDBY, STANDBY_POSTBACK, FOLLOW, UNFOLLOW, JOIN, LEAVE, UNSEND, READ, no_source, "junk", 7]
    parsed = parser.parse_webhook(webhook({"events": [*events, text_event(event_id="kept")]}))
    assert [e.dedup_key for e in parsed.events] == ["kept"]
    assert parsed.ignored == len(events)


def test_partial_events_are_still_parsed(parser: LineAdapter) -> None:
    # The SDK's WebhookParser turns the first into an UnknownEvent and raises on the second.
    no_quote = text_event(event_id="E1")
    del no_quote["message"]["quoteToken"]
    bare = {
        "type": "message",
        "source": {"type": "user", "userId": "U9"},
        "message": {"id": "m9", "type": "text", "text": "bare"},
    }
    parsed = parser.parse_webhook(webhook(payload(no_quote, bare)))
    assert [(e.text, e.conversation) for e in parsed.events] == [("hello", "U1"), ("bare", "U9")]
    assert parsed.events[1].dedup_key == "m9"  # no webhookEventId: the message id
    assert parsed.events[1].timestamp is None
    assert parsed.events[1].reply_token is None
    assert parsed.events[1].reply_token_expires_at is None


def test_dedup_key_without_ids_is_a_stable_hash() -> None:
    postback = {"type": "postback", "source": {"type": "user", "userId": "U1"}, "postback": {"data": "d"}}
    again = {**postback, "deliveryContext": {"isRedelivery": True}}
    assert dedup_key_of(postback) == dedup_key_of(again)
    assert dedup_key_of(postback) != dedup_key_of({**postback, "postback": {"data": "e"}})


@pytest.mark.parametrize(
    ("message", "attachment"),
    [
        (
            {"id": "1", "type": "sticker", "packageId": "446", "stickerId": "1988", "stickerResourceType": "STATIC"},
            {"type": "sticker", "id": "1", "packageId": "446", "stickerId": "1988", "stickerResourceType": "STATIC"},
        ),
        (
            {"id": "2", "type": "image", "contentProvider": {"type": "line"}, "quoteToken": "q"},
            {"type": "image", "id": "2", "contentProvider": {"type": "line"}},
        ),
        (
            {"id": "3", "type": "location", "title": "Home", "latitude": 35.6, "longitude": 139.7},
            {"type": "location", "id": "3", "title": "Home", "latitude": 35.6, "longitude": 139.7},
        ),
        (
            {"id": "4", "type": "file", "fileName": "a.pdf", "fileSize": 10},
            {"type": "file", "id": "4", "fileName": "a.pdf", "fileSize": 10},
        ),
        ({"id": "5", "type": "audio", "duration": 6000}, {"type": "audio", "id": "5", "duration": 6000}),
        ({"id": "6", "type": "video", "duration": 9000}, {"type": "video", "id": "6", "duration": 9000}),
    ],
    ids=["sticker", "image", "location", "file", "audio", "video"],
)
def test_non_text_messages_become_attachments(
    parser: LineAdapter, message: dict[str, Any], attachment: dict[str, Any]
) -> None:
    event = text_event()
    event["message"] = message
    [parsed] = parser.parse_webhook(webhook(payload(event))).events
    assert parsed.kind is EventKind.MESSAGE
    assert parsed.text is None
    assert parsed.attachments == (attachment,)
    assert parsed.message_id == message["id"]


def test_redelivery_keeps_the_dedup_key(parser: LineAdapter) -> None:
    first = text_event()
    again = text_event(deliveryContext={"isRedelivery": True})
    [a] = parser.parse_webhook(webhook(payload(first))).events
    [b] = parser.parse_webhook(webhook(payload(again))).events
    assert a.dedup_key == b.dedup_key == "01HEVENT1"


# -- pure send helpers ----------------------------------------------------------------------


def test_retry_key_is_deterministic() -> None:
    assert retry_key("line-main", "reply:1:0") == str(uuid.uuid5(RETRY_KEY_NAMESPACE, "line-main:reply:1:0"))
    assert retry_key("line-main", "reply:1:0") == retry_key("line-main", "reply:1:0")
    assert retry_key("line-main", "reply:1:0") != retry_key("line-other", "reply:1:0")
    assert retry_key("line-main", "reply:1:0", 1) != retry_key("line-main", "reply:1:0")


@pytest.mark.parametrize(
    ("status", "message", "retryable", "retry_after_s"),
    [
        (429, "You have reached your monthly limit.", False, None),
        (429, "The API rate limit has been exceeded. Try again later.", True, 1.0),
        (500, "Internal error", True, None),
        (503, "", True, None),
        (400, "The request body has 1 error(s)", False, None),
        (401, "Authentication failed due to the expired access token", False, None),
        (403, "Not authorized to use this endpoint", False, None),
        (404, "Not found", False, None),
        (0, "", False, None),
    ],
)
def test_classify_error(status: int, message: str, retryable: bool, retry_after_s: float | None) -> None:
    error = classify_error(status, message)
    assert (error.retryable, error.retry_after_s) == (retryable, retry_after_s)
    assert str(status) in error.reason


def test_error_message_and_reply_token_predicate() -> None:
    body = json.dumps(
        {
            "message": "The request body has 1 error(s)",
            "details": [{"message": "May not be empty", "property": "messages[0].text"}],
        }
    )
    assert error_message(body) == "The request body has 1 error(s) (messages[0].text: May not be empty)"
    assert error_message("<html>oops</html>") == "<html>oops</html>"
    assert error_message(None) == ""
    assert is_invalid_reply_token(400, "Invalid reply token")
    assert not is_invalid_reply_token(400, "The request body has 1 error(s)")
    assert not is_invalid_reply_token(401, "Invalid reply token")


# -- sending --------------------------------------------------------------------------------


async def test_fresh_reply_uses_the_reply_token(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    await adapter.send(outbound(reply_token="reply-token-1", expires_at=clock.now + 30))
    [request] = api.to(REPLY)
    assert request.method == "POST"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    body = request.json()
    assert body["replyToken"] == "reply-token-1"
    assert body["messages"] == [{"type": "text", "text": "hi there"}]
    assert "X-Line-Retry-Key" not in request.headers
    assert api.to(PUSH) == []


async def test_push_retry_key_is_the_same_on_every_attempt(api: FakePlatform, adapter: LineAdapter) -> None:
    api.fail_next(PUSH, Answer(500, json_body={"message": "Internal server error"}))
    message = outbound(kind=MessageKind.BOT, key="bot:42")
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(message)
    assert failed.value.retryable
    message.attempts = 1
    await adapter.send(message)
    first, second = api.to(PUSH)
    assert first.headers["X-Line-Retry-Key"] == second.headers["X-Line-Retry-Key"]
    assert first.headers["X-Line-Retry-Key"] == retry_key("line-main", "bot:42")
    assert second.headers["Authorization"] == f"Bearer {TOKEN}"
    assert second.json()["to"] == "U1"
    assert second.json()["messages"] == [{"type": "text", "text": "hi there"}]


async def test_retry_key_survives_a_restart(api: FakePlatform, clock: Clock) -> None:
    keys = []
    for _ in range(2):
        line = LineAdapter(endpoint(api.url), clock=clock)
        async with aiohttp.ClientSession() as http:
            await line.start(http)
            await line.send(outbound(kind=MessageKind.BOT, key="bot:7"))
            await line.aclose()
        keys.append(api.to(PUSH)[-1].headers["X-Line-Retry-Key"])
    assert keys[0] == keys[1]


async def test_closure_notice_always_pushes(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    await adapter.send(outbound(kind=MessageKind.CLOSURE, key="close:s1", reply_token="t", expires_at=clock.now + 30))
    assert api.to(REPLY) == []
    [push] = api.to(PUSH)
    assert push.headers["X-Line-Retry-Key"] == retry_key("line-main", "close:s1")


@pytest.mark.parametrize(
    ("expires_in_s", "attempts", "token"),
    [(-1.0, 0, "t"), (0.0, 0, "t"), (-1.0, 1, "t"), (30.0, 0, None)],
    ids=["expired", "at-expiry", "late-retry", "no-token"],
)
async def test_late_retried_or_tokenless_replies_push(
    api: FakePlatform, adapter: LineAdapter, clock: Clock, expires_in_s: float, attempts: int, token: str | None
) -> None:
    await adapter.send(outbound(reply_token=token, expires_at=clock.now + expires_in_s, attempts=attempts))
    assert api.to(REPLY) == []
    assert len(api.to(PUSH)) == 1


async def test_a_retry_replies_again_while_the_token_is_fresh(
    api: FakePlatform, adapter: LineAdapter, clock: Clock
) -> None:
    """After an unclear failure, the same token is tried again: if the first attempt did not get
    through, the reply goes out now, once, for free (no push quota)."""
    await adapter.send(outbound(reply_token="t", expires_at=clock.now + 30, attempts=1))
    assert len(api.to(REPLY)) == 1 and api.to(PUSH) == []


@pytest.mark.parametrize(
    ("attempts", "created_at"), [(1, 1_700_000_000.0), (0, 1_600_000_000.0)], ids=["retry", "from-previous-run"]
)
async def test_a_fresh_token_refused_after_an_earlier_attempt_means_delivered(
    api: FakePlatform, adapter: LineAdapter, clock: Clock, attempts: int, created_at: float
) -> None:
    """A token works once and only we hold it: refused while fresh, for a message an earlier
    attempt (a retry, or a run before a crash) may have sent, it was used by that attempt.
    Pushing now would show the user the text twice."""
    api.fail_next(REPLY, Answer(400, json_body={"message": "Invalid reply token"}))
    await adapter.send(outbound(reply_token="t", expires_at=clock.now + 30, attempts=attempts, created_at=created_at))
    assert len(api.to(REPLY)) == 1 and api.to(PUSH) == []


async def test_rejected_reply_token_falls_back_to_push(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    api.fail_next(REPLY, Answer(400, json_body={"message": "Invalid reply token"}))
    await adapter.send(outbound(reply_token="stale", expires_at=clock.now + 30))
    assert len(api.to(REPLY)) == 1
    [push] = api.to(PUSH)
    assert push.headers["X-Line-Retry-Key"] == retry_key("line-main", "reply:1:0")


async def test_reply_timeout_is_retryable_without_a_push(api: FakePlatform, clock: Clock) -> None:
    line = LineAdapter(endpoint(api.url), clock=clock, request_timeout_s=0.2)
    api.fail_next(REPLY, Answer(json_body={"sentMessages": []}, delay_s=0.6))
    async with aiohttp.ClientSession() as http:
        await line.start(http)
        try:
            with pytest.raises(DeliveryError) as failed:
                await line.send(outbound(reply_token="t", expires_at=clock.now + 30))
        finally:
            await line.aclose()
    assert failed.value.retryable
    # send() returned: any fallback push would have been made and recorded by now.
    assert api.to(PUSH) == []


async def test_reply_server_error_is_retryable_without_a_push(
    api: FakePlatform, adapter: LineAdapter, clock: Clock
) -> None:
    api.fail_next(REPLY, Answer(502, json_body={"message": "Bad gateway"}))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound(reply_token="t", expires_at=clock.now + 30))
    assert failed.value.retryable
    assert api.to(PUSH) == []


async def test_duplicate_retry_key_counts_as_delivered(api: FakePlatform, adapter: LineAdapter) -> None:
    api.fail_next(PUSH, Answer(409, json_body={"message": "The retry key is already accepted"}))
    await adapter.send(outbound(kind=MessageKind.BOT))
    assert len(api.to(PUSH)) == 1


async def test_monthly_limit_is_permanent(api: FakePlatform, adapter: LineAdapter) -> None:
    api.fail_next(PUSH, Answer(429, json_body={"message": "You have reached your monthly limit."}))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound(kind=MessageKind.BOT))
    assert not failed.value.retryable
    assert "monthly quota reached" in failed.value.reason


async def test_rate_limit_is_retryable(api: FakePlatform, adapter: LineAdapter) -> None:
    api.fail_next(PUSH, Answer(429, json_body={"message": "The API rate limit has been exceeded. Try again later."}))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound(kind=MessageKind.BOT))
    assert failed.value.retryable
    assert failed.value.retry_after_s == 1.0


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "The request body has 1 error(s)"),
        (401, "Authentication failed due to the following reason: invalid token."),
        (403, "Access to this API is not available for your account"),
    ],
)
async def test_client_errors_are_permanent_and_name_status_and_message(
    api: FakePlatform, adapter: LineAdapter, status: int, message: str
) -> None:
    api.fail_next(PUSH, Answer(status, json_body={"message": message}))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound(kind=MessageKind.BOT))
    assert not failed.value.retryable
    assert str(status) in failed.value.reason
    assert message in failed.value.reason
    assert TOKEN not in failed.value.reason
    assert TOKEN not in str(failed.value)


async def test_connection_error_is_retryable(clock: Clock) -> None:
    async with FakePlatform() as gone:
        url = gone.url  # a port that nothing listens on once the server closed
    line = LineAdapter(endpoint(url), clock=clock)
    async with aiohttp.ClientSession() as http:
        await line.start(http)
        with pytest.raises(DeliveryError) as failed:
            await line.send(outbound(kind=MessageKind.BOT))
        await line.aclose()
    assert failed.value.retryable
    assert TOKEN not in failed.value.reason


async def test_success_with_an_unexpected_body_is_still_delivered(api: FakePlatform, adapter: LineAdapter) -> None:
    # The SDK validates 2xx bodies against its model and raises when they do not match.
    api.fail_next(PUSH, Answer(json_body={}))
    await adapter.send(outbound(kind=MessageKind.BOT))
    assert len(api.to(PUSH)) == 1


async def test_long_text_is_split_into_one_request(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    text = "x" * 12_000
    await adapter.send(outbound(text=text, reply_token="t", expires_at=clock.now + 30))
    [request] = api.to(REPLY)
    assert [len(m["text"]) for m in request.json()["messages"]] == [5000, 5000, 2000]


async def test_long_text_is_split_in_utf16_units(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    text = "\N{GRINNING FACE}" * 3000  # 6000 UTF-16 units: 5000 of them fit in one message
    await adapter.send(outbound(text=text, reply_token="t", expires_at=clock.now + 30))
    [request] = api.to(REPLY)
    assert [len(m["text"]) for m in request.json()["messages"]] == [2500, 500]


async def test_very_long_text_pushes_in_batches_of_five(api: FakePlatform, adapter: LineAdapter, clock: Clock) -> None:
    # Six parts: two requests. Never a reply, whose repeat after a failed second batch would
    # carry no retry key; each batch has its own stable key.
    api.fail_next(PUSH, SENT, Answer(503, json_body={"message": "busy"}))
    message = outbound(text="y" * 30_000, reply_token="t", expires_at=clock.now + 30)
    with pytest.raises(DeliveryError):
        await adapter.send(message)
    api.fail_next(PUSH, Answer(409, json_body={"message": "The retry key is already accepted"}))
    message.attempts = 1
    await adapter.send(message)
    assert api.to(REPLY) == []
    pushes = api.to(PUSH)
    assert [len(p.json()["messages"]) for p in pushes] == [5, 1, 5, 1]
    keys = [p.headers["X-Line-Retry-Key"] for p in pushes]
    assert keys[0] == keys[2] == retry_key("line-main", "reply:1:0")
    assert keys[1] == keys[3] == retry_key("line-main", "reply:1:0", 1)


async def test_empty_text_is_skipped(api: FakePlatform, adapter: LineAdapter) -> None:
    with pytest.raises(DeliverySkipped):
        await adapter.send(outbound(text=""))
    assert api.requests == []


async def test_proxy_environment_is_ignored(
    api: FakePlatform, clock: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # The SDK's own session has trust_env=True: it would route 127.0.0.1 to this dead proxy.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password leaked\n")
    monkeypatch.setenv("NETRC", str(netrc))
    line = LineAdapter(endpoint(api.url), clock=clock)
    async with aiohttp.ClientSession() as http:
        await line.start(http)
        await line.send(outbound(kind=MessageKind.BOT))
        await line.aclose()
    [push] = api.to(PUSH)
    assert push.headers["Authorization"] == f"Bearer {TOKEN}"


async def test_lifecycle(api: FakePlatform, clock: Clock) -> None:
    line = LineAdapter(endpoint(api.url), clock=clock)
    assert TOKEN not in repr(line) and SECRET not in repr(line)
    with pytest.raises(DeliveryError) as before:
        await line.send(outbound(kind=MessageKind.BOT))
    assert before.value.retryable
    async with aiohttp.ClientSession() as http:
        await line.start(http)
        await line.start(http)  # a second start is a no-op
        await line.aclose()
        await line.aclose()  # safe twice
        with pytest.raises(DeliveryError):
            await line.send(outbound(kind=MessageKind.BOT))
        with pytest.raises(RuntimeError):
            await line.start(http)
    assert api.requests == []
