"""Messenger adapter: handshake, signed webhooks signed as Meta signs them, and the Send API
against a recording fake Graph API on port 0."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

import channels.messenger as messenger
from channels.base import WebhookRequest
from channels.messenger import (
    MessengerAdapter,
    classify_error,
    is_echo,
    is_interaction,
    is_postback,
    is_user_message,
)
from channels.registry import Channel
from gateway.errors import BadPayload, BadSignature, DeliveryError, DeliverySkipped, Forbidden
from gateway.models import EventKind, MessageKind, OutboundMessage
from gateway.settings import EndpointSettings, Secret
from tests.fakeplatform import Answer, FakePlatform
from tests.outbound import outbound_message

APP_SECRET = "s3cr3t-app"
VERIFY_TOKEN = "verify-me"
PAGE_TOKEN = "EAAB-page-token-do-not-leak"
PAGE = "111"
PSID = "2222"
NOW = 1_700_000_000.0
SEND_PATH = "/v21.0/me/messages"


def make_endpoint(api_base_url: str | None = None, **extra: str) -> EndpointSettings:
    credentials = {
        "app_secret": Secret(APP_SECRET),
        "verify_token": Secret(VERIFY_TOKEN),
        "page_access_token": Secret(PAGE_TOKEN),
    }
    credentials.update({key: Secret(value) for key, value in extra.items()})
    return EndpointSettings(
        name="fb", channel=Channel.MESSENGER, path="/webhooks/fb", api_base_url=api_base_url, credentials=credentials
    )


def make_adapter(api_base_url: str | None = None, now: float = NOW, **extra: str) -> MessengerAdapter:
    return MessengerAdapter(make_endpoint(api_base_url, **extra), clock=lambda: now)


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    """What Meta puts in X-Hub-Signature-256: HMAC-SHA256 over the raw bytes it sends."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def meta_body(payload: Any) -> bytes:
    """Meta's serialisation: non-ASCII escaped as \\uXXXX, then signed as is."""
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


def post(body: bytes, headers: dict[str, str] | None = None, *, sign: bool = True) -> WebhookRequest:
    all_headers = CIMultiDict({"Content-Type": "application/json"})
    if sign:
        all_headers["X-Hub-Signature-256"] = meta_signature(body)
    all_headers.update(headers or {})
    return WebhookRequest(
        method="POST",
        path="/webhooks/fb",
        query={},
        public_url="https://bots.example.com/webhooks/fb",
        headers=all_headers,
        body=body,
        content_type="application/json",
    )


def get(query: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(
        method="GET",
        path="/webhooks/fb",
        query=query,
        public_url="https://bots.example.com/webhooks/fb",
        headers=CIMultiDict(),
        body=b"",
    )


def page(*entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "object": "page",
        "entry": [{"id": PAGE, "time": 1_700_000_000_000, "messaging": items} for items in entries],
    }


def text_item(mid: str, text: str, ts: int, psid: str = PSID) -> dict[str, Any]:
    return {
        "sender": {"id": psid},
        "recipient": {"id": PAGE},
        "timestamp": ts,
        "message": {"mid": mid, "text": text},
    }


ECHO = {
    "sender": {"id": PAGE},
    "recipient": {"id": PSID},
    "timestamp": 1_700_000_000_500,
    "message": {"mid": "m_echo", "is_echo": True, "app_id": 42, "text": "our reply"},
}
DELIVERY = {
    "sender": {"id": PSID},
    "recipient": {"id": PAGE},
    "delivery": {"mids": ["m_echo"], "watermark": 1_700_000_000_600},
}
READ = {"sender": {"id": PSID}, "recipient": {"id": PAGE}, "timestamp": 1, "read": {"watermark": 1_700_000_000_700}}
REACTION = {
    "sender": {"id": PSID},
    "recipient": {"id": PAGE},
    "timestamp": 1_700_000_000_800,
    "reaction": {"mid": "m_1", "action": "react", "reaction": "love", "emoji": "\u2764"},
}
POSTBACK = {
    "sender": {"id": PSID},
    "recipient": {"id": PAGE},
    "timestamp": 1_700_000_001_000,
    "postback": {"title": "Get Started", "payload": "GET_STARTED", "mid": "m_pb"},
}
IMAGE = {
    "sender": {"id": PSID},
    "recipient": {"id": PAGE},
    "timestamp": 1_700_000_002_000,
    "message": {
        "mid": "m_img",
        "attachments": [{"type": "image", "payload": {"url": "https://cdn.example.com/cat.jpg"}}],
    },
}


# -- handshake ---------------------------------------------------------------------------------


def test_handshake_answers_the_challenge() -> None:
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"}
    response = make_adapter().handshake(get(query))
    assert (response.status, response.text) == (200, "1158201444")


@pytest.mark.parametrize(
    "query",
    [
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "c"},
        {"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "c"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "c"},
    ],
)
def test_handshake_with_a_wrong_token_or_mode_is_forbidden(query: dict[str, str]) -> None:
    with pytest.raises(Forbidden):
        make_adapter().handshake(get(query))


def test_handshake_without_a_configured_token_is_forbidden() -> None:
    adapter = MessengerAdapter(EndpointSettings(name="fb", channel=Channel.MESSENGER, path="/webhooks/fb"))
    with pytest.raises(Forbidden):
        adapter.handshake(get({"hub.mode": "subscribe", "hub.verify_token": "", "hub.challenge": "c"}))


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.challenge": "c"},
        {"hub.verify_token": VERIFY_TOKEN, "hub.challenge": "c"},
    ],
)
def test_handshake_with_missing_parameters_is_forbidden(query: dict[str, str]) -> None:
    with pytest.raises(Forbidden):
        make_adapter().handshake(get(query))


# -- signature ---------------------------------------------------------------------------------


def test_signature_is_over_the_raw_bytes_with_escaped_non_ascii() -> None:
    body = meta_body(page([text_item("m_1", "h\u00e9llo \U0001f44b \u65e5\u672c", 1_700_000_000_000)]))
    assert b"\\u00e9" in body and b"\\ud83d\\udc4b" in body  # signed exactly as Meta sends it
    parsed = make_adapter().parse_webhook(post(body))
    assert [event.text for event in parsed.events] == ["h\u00e9llo \U0001f44b \u65e5\u672c"]


def test_signature_is_not_recomputed_over_a_reserialised_body() -> None:
    body = b'{ "object" : "page",\n  "entry": [] }'
    parsed = make_adapter().parse_webhook(post(body))
    assert parsed.events == [] and parsed.response.status == 200


def sha1_signature(body: bytes) -> str:
    return "sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest()


BODY = meta_body(page([text_item("m_1", "hi", 1_700_000_000_000)]))


@pytest.mark.parametrize(
    ("headers", "sign"),
    [
        pytest.param({}, False, id="missing"),
        pytest.param({"X-Hub-Signature": sha1_signature(BODY)}, False, id="sha1-only"),
        pytest.param({"X-Hub-Signature-256": meta_signature(BODY, "forged-secret")}, False, id="forged"),
        pytest.param({"X-Hub-Signature-256": meta_signature(BODY + b" ")}, False, id="other-body"),
        pytest.param({"X-Hub-Signature-256": meta_signature(BODY)[7:]}, False, id="no-prefix"),
        pytest.param({"X-Hub-Signature-256": sha1_signature(BODY)}, False, id="sha1-in-256-header"),
        pytest.param({"X-Hub-Signature-256": "sha256=" + "zz" * 32}, False, id="not-hex"),
        pytest.param({"X-Hub-Signature-256": "sha256=\u00e9" * 3}, False, id="non-ascii"),
        pytest.param({"X-Hub-Signature-256": ""}, False, id="empty"),
    ],
)
def test_bad_signatures_are_rejected(headers: dict[str, str], sign: bool) -> None:
    with pytest.raises(BadSignature):
        make_adapter().parse_webhook(post(BODY, headers, sign=sign))


def test_signature_is_checked_before_the_body_is_parsed() -> None:
    with pytest.raises(BadSignature):
        make_adapter().parse_webhook(post(b"not json", {"X-Hub-Signature-256": "sha256=" + "0" * 64}, sign=False))


def test_without_an_app_secret_nothing_is_accepted() -> None:
    adapter = MessengerAdapter(EndpointSettings(name="fb", channel=Channel.MESSENGER, path="/webhooks/fb"))
    body = b'{"object":"page","entry":[]}'
    with pytest.raises(BadSignature):
        adapter.parse_webhook(post(body, {"X-Hub-Signature-256": meta_signature(body, "")}, sign=False))


def test_signature_hex_may_be_upper_case() -> None:
    body = b'{"object":"page","entry":[]}'
    headers = {"X-Hub-Signature-256": "sha256=" + meta_signature(body)[7:].upper()}
    assert make_adapter().parse_webhook(post(body, headers, sign=False)).response.status == 200


# -- malformed bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
        pytest.param(b'[{"object":"page"}]', id="array"),
        pytest.param(b'"page"', id="string"),
        pytest.param(b'{"object":"instagram","entry":[]}', id="other-object"),
        pytest.param(b'{"object":"page"}', id="no-entry"),
        pytest.param(b'{"object":"page","entry":{}}', id="entry-not-list"),
    ],
)
def test_malformed_bodies_are_bad_payloads(body: bytes) -> None:
    with pytest.raises(BadPayload):
        make_adapter().parse_webhook(post(body))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"object":"page","entry":[1]}', id="entry-item-not-object"),
        pytest.param(b'{"object":"page","entry":[{"messaging":{}}]}', id="messaging-not-list"),
        pytest.param(b'{"object":"page","entry":[{"messaging":["x"]}]}', id="messaging-item-not-object"),
        pytest.param(
            b'{"object":"page","entry":[{"messaging":[{"timestamp":1,"message":{"mid":"m","text":"x"}}]}]}',
            id="no-sender",
        ),
        pytest.param(
            b'{"object":"page","entry":[{"messaging":[{"sender":{"id":"1"},"message":{"mid":"m"}}]}]}',
            id="no-timestamp",
        ),
        pytest.param(
            b'{"object":"page","entry":[{"messaging":[{"sender":{"id":"1"},"timestamp":1,"message":{"text":"x"}}]}]}',
            id="message-without-mid",
        ),
        pytest.param(
            b'{"object":"page","entry":[{"messaging":[{"sender":{"user_ref":"r"},"timestamp":1,"postback":{}}]}]}',
            id="user-ref-only",
        ),
        pytest.param(
            b'{"object":"page","entry":[{"messaging":[{"sender":{"id":"1"},"timestamp":"x","postback":{}}]}]}',
            id="non-numeric-timestamp",
        ),
    ],
)
def test_items_the_gateway_cannot_handle_are_counted_and_dropped_alone(body: bytes) -> None:
    """DESIGN.md "Platform payloads as they really come": each messaging item stands alone."""
    parsed = make_adapter().parse_webhook(post(body))
    assert parsed.events == []
    assert parsed.ignored == 1
    assert parsed.response.status == 200


# -- parsing -----------------------------------------------------------------------------------


def test_every_item_of_every_entry_becomes_an_event_in_timestamp_order() -> None:
    body = meta_body(
        page(
            [text_item("m_4", "four", 1_700_000_004_000), text_item("m_2", "two", 1_700_000_002_000, psid="9")],
            [text_item("m_3", "three", 1_700_000_003_000), text_item("m_1", "one", 1_700_000_001_000)],
        )
    )
    parsed = make_adapter().parse_webhook(post(body))
    assert [event.text for event in parsed.events] == ["one", "two", "three", "four"]
    assert [event.dedup_key for event in parsed.events] == ["m_1", "m_2", "m_3", "m_4"]
    assert [event.message_id for event in parsed.events] == ["m_1", "m_2", "m_3", "m_4"]
    assert [event.conversation for event in parsed.events] == [PSID, "9", PSID, PSID]
    assert [event.timestamp for event in parsed.events] == [
        1_700_000_001.0,
        1_700_000_002.0,
        1_700_000_003.0,
        1_700_000_004.0,
    ]
    assert all(event.kind is EventKind.MESSAGE and event.is_interaction for event in parsed.events)
    assert parsed.ignored == 0
    assert (parsed.response.status, parsed.response.text) == (200, "EVENT_RECEIVED")


def test_housekeeping_is_counted_and_dropped() -> None:
    body = meta_body(page([ECHO, DELIVERY, text_item("m_1", "hi", 1_700_000_000_000)], [READ, REACTION]))
    parsed = make_adapter().parse_webhook(post(body))
    assert [event.dedup_key for event in parsed.events] == ["m_1"]
    assert parsed.ignored == 4
    assert parsed.response.text == "EVENT_RECEIVED"


def test_standby_and_page_changes_are_housekeeping() -> None:
    payload = {
        "object": "page",
        "entry": [
            {"id": PAGE, "time": 1, "standby": [text_item("m_s", "for the other app", 1)]},
            {"id": PAGE, "time": 1, "changes": [{"field": "feed", "value": {}}]},
        ],
    }
    parsed = make_adapter().parse_webhook(post(meta_body(payload)))
    assert (parsed.events, parsed.ignored) == ([], 2)


def test_postback_is_an_interaction_with_its_title_and_payload() -> None:
    parsed = make_adapter().parse_webhook(post(meta_body(page([POSTBACK]))))
    (event,) = parsed.events
    assert event.kind is EventKind.POSTBACK and event.is_interaction
    assert (event.conversation, event.text, event.dedup_key, event.message_id) == (
        PSID,
        "Get Started",
        "m_pb",
        "m_pb",
    )
    assert event.attachments == ({"type": "postback", "payload": "GET_STARTED"},)
    assert event.timestamp == 1_700_000_001.0


def test_postback_without_mid_is_deduplicated_on_sender_and_time() -> None:
    item = {**POSTBACK, "postback": {"title": "Menu", "payload": "MENU"}}
    (event,) = make_adapter().parse_webhook(post(meta_body(page([item])))).events
    assert event.dedup_key == f"postback:{PSID}:1700000001000"
    assert event.message_id is None


def test_image_is_a_message_without_text_and_with_the_attachment() -> None:
    (event,) = make_adapter().parse_webhook(post(meta_body(page([IMAGE])))).events
    assert event.kind is EventKind.MESSAGE and event.is_interaction
    assert event.text is None
    assert event.attachments == ({"type": "image", "payload": {"url": "https://cdn.example.com/cat.jpg"}},)
    assert event.dedup_key == event.message_id == "m_img"


def test_sticker_and_quick_reply() -> None:
    sticker = {
        **IMAGE,
        "message": {
            "mid": "m_st",
            "sticker_id": 369239263222822,
            "attachments": [{"type": "image", "payload": {"url": "u", "sticker_id": 369239263222822}}],
        },
    }
    quick = text_item("m_q", "Yes", 1_700_000_003_000)
    quick["message"]["quick_reply"] = {"payload": "YES"}
    events = make_adapter().parse_webhook(post(meta_body(page([sticker, quick])))).events
    assert events[0].text is None and events[0].attachments[0]["payload"]["sticker_id"] == 369239263222822
    assert events[1].text == "Yes" and events[1].attachments == ({"type": "quick_reply", "payload": "YES"},)


def test_numeric_sender_id_becomes_a_string() -> None:
    item = text_item("m_1", "hi", 1)
    item["sender"] = {"id": 2222}
    (event,) = make_adapter().parse_webhook(post(meta_body(page([item])))).events
    assert event.conversation == "2222"


# -- predicates --------------------------------------------------------------------------------

MESSAGE = text_item("m_1", "hi", 1)


@pytest.mark.parametrize(
    ("item", "user_message", "postback", "echo", "interaction"),
    [
        pytest.param(MESSAGE, True, False, False, True, id="text"),
        pytest.param(IMAGE, True, False, False, True, id="image"),
        pytest.param(POSTBACK, False, True, False, True, id="postback"),
        pytest.param(ECHO, False, False, True, False, id="echo"),
        pytest.param(DELIVERY, False, False, False, False, id="delivery"),
        pytest.param(READ, False, False, False, False, id="read"),
        pytest.param(REACTION, False, False, False, False, id="reaction"),
        pytest.param({"sender": {"id": PSID}, "optin": {"ref": "x"}}, False, False, False, False, id="optin"),
        pytest.param({"message": "not an object"}, False, False, False, False, id="odd-message"),
        pytest.param({}, False, False, False, False, id="empty"),
    ],
)
def test_predicates(item: dict[str, Any], user_message: bool, postback: bool, echo: bool, interaction: bool) -> None:
    assert (is_user_message(item), is_postback(item), is_echo(item), is_interaction(item)) == (
        user_message,
        postback,
        echo,
        interaction,
    )


@pytest.mark.parametrize(
    ("status", "error", "retryable", "skipped"),
    [
        (500, {}, True, False),
        (503, None, True, False),
        (429, {"code": 4, "message": "rate"}, True, False),
        (400, {"code": 613, "message": "Calls to this api have exceeded the rate limit."}, True, False),
        (400, {"code": 17, "message": "User request limit reached"}, True, False),
        (400, {"code": 32, "message": "Page request limit reached"}, True, False),
        (400, {"code": 2, "message": "temporarily unavailable", "is_transient": True}, True, False),
        (400, {"code": 10, "error_subcode": 2018278, "message": "(#10) outside of allowed window"}, False, True),
        (400, {"code": 100, "error_subcode": 2018278, "message": "window"}, False, True),
        (400, {"message": "(#10) This message is sent outside of allowed window."}, False, True),
        (400, {"code": 551, "message": "This person isn't available right now."}, False, False),
        (400, {"code": 190, "message": "Invalid OAuth access token."}, False, False),
        (400, {"code": 100, "message": "Invalid parameter"}, False, False),
        (404, None, False, False),
    ],
)
def test_classify_error(status: int, error: dict[str, Any] | None, retryable: bool, skipped: bool) -> None:
    result = classify_error(status, None if error is None else {"error": error}, 1.5)
    assert result.retryable is retryable
    assert isinstance(result, DeliverySkipped) is skipped
    if retryable:
        assert result.retry_after_s == 1.5
    if error and "code" in error:
        assert f"code {error['code']}" in result.reason


# -- sending -----------------------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as platform:
        yield platform


@pytest.fixture
async def adapter(api: FakePlatform, http: aiohttp.ClientSession) -> AsyncIterator[MessengerAdapter]:
    adapter = make_adapter(api.url)
    await adapter.start(http)
    yield adapter
    await adapter.aclose()


def outbound(
    text: str = "hello",
    kind: MessageKind = MessageKind.REPLY,
    last_seen: float | None = NOW - 60,
    key: str = "reply:1:0",
) -> OutboundMessage:
    return outbound_message(
        "fb", "messenger", PSID, text, key=key, kind=kind, created_at=NOW, user_last_seen_at=last_seen
    )


def graph_error(status: int, code: int, message: str, **extra: Any) -> Answer:
    return Answer(
        status=status, json_body={"error": {"message": message, "type": "OAuthException", "code": code, **extra}}
    )


async def test_send_posts_to_the_send_api(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.respond(SEND_PATH, Answer(json_body={"recipient_id": PSID, "message_id": "m_out"}))
    await adapter.send(outbound("hello"))
    (request,) = api.to(SEND_PATH)
    assert request.method == "POST"
    assert request.query == {"access_token": PAGE_TOKEN}
    assert request.json() == {"recipient": {"id": PSID}, "messaging_type": "RESPONSE", "message": {"text": "hello"}}


@pytest.mark.parametrize(
    ("kind", "messaging_type"),
    [(MessageKind.REPLY, "RESPONSE"), (MessageKind.CLOSURE, "UPDATE"), (MessageKind.BOT, "UPDATE")],
)
async def test_messaging_type_follows_the_kind(
    api: FakePlatform, adapter: MessengerAdapter, kind: MessageKind, messaging_type: str
) -> None:
    await adapter.send(outbound(kind=kind))
    assert api.to(SEND_PATH)[0].json()["messaging_type"] == messaging_type


async def test_api_version_comes_from_the_credentials(api: FakePlatform, http: aiohttp.ClientSession) -> None:
    adapter = make_adapter(api.url, api_version="v19.0")
    await adapter.start(http)
    await adapter.send(outbound())
    assert [request.path for request in api.requests] == ["/v19.0/me/messages"]


async def test_long_text_is_sent_in_parts_of_at_most_2000_chars(api: FakePlatform, adapter: MessengerAdapter) -> None:
    words = [f"w{i:04d}" for i in range(900)]  # 900 * 6 - 1 = 5399 characters
    await adapter.send(outbound(" ".join(words)))
    texts = [request.json()["message"]["text"] for request in api.to(SEND_PATH)]
    assert len(texts) == 3 and all(len(text) <= 2000 for text in texts)
    assert " ".join(texts).split() == words


async def test_a_retry_after_a_partial_send_resumes_at_the_failed_part(
    api: FakePlatform, adapter: MessengerAdapter
) -> None:
    text = "a" * 2000 + " " + "b" * 2000 + " " + "c" * 10
    api.respond(SEND_PATH, Answer())
    api.fail_next(SEND_PATH, Answer(), Answer(status=503, json_body={}))
    message = outbound(text)
    reported: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:  # as the outbox does, which also stores it
        reported.append((done, total))
        message.parts_sent = done

    with pytest.raises(DeliveryError) as caught:
        await adapter.send(message, progress)
    assert caught.value.retryable
    assert reported == [(1, 3)]
    await adapter.send(message, progress)
    texts = [request.json()["message"]["text"][0] for request in api.to(SEND_PATH)]
    assert texts == ["a", "b", "b", "c"]
    assert reported == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize(
    "last_seen",
    [pytest.param(None, id="never-seen"), pytest.param(NOW - 24 * 3600 - 1, id="over-24h")],
)
@pytest.mark.parametrize("kind", list(MessageKind))
async def test_outside_the_24h_window_nothing_is_sent(
    api: FakePlatform, adapter: MessengerAdapter, last_seen: float | None, kind: MessageKind
) -> None:
    with pytest.raises(DeliverySkipped) as caught:
        await adapter.send(outbound(kind=kind, last_seen=last_seen))
    assert "24 h" in caught.value.reason and not caught.value.retryable
    assert api.requests == []


async def test_just_inside_the_24h_window_is_sent(api: FakePlatform, adapter: MessengerAdapter) -> None:
    await adapter.send(outbound(kind=MessageKind.CLOSURE, last_seen=NOW - 24 * 3600))
    assert len(api.to(SEND_PATH)) == 1


async def test_500_is_retryable(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.fail_next(SEND_PATH, graph_error(500, 1, "An unknown error occurred"))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert caught.value.retryable and not isinstance(caught.value, DeliverySkipped)


async def test_429_is_retryable_after_the_given_delay(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.fail_next(SEND_PATH, Answer(status=429, json_body={}, headers={"Retry-After": "7"}))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert caught.value.retryable and caught.value.retry_after_s == 7.0


async def test_rate_limit_code_613_is_retryable(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.fail_next(SEND_PATH, graph_error(400, 613, "Calls to this api have exceeded the rate limit."))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert caught.value.retryable and caught.value.retry_after_s is None


async def test_outside_window_answer_is_skipped(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.fail_next(
        SEND_PATH,
        graph_error(400, 10, "(#10) This message is sent outside of allowed window.", error_subcode=2018278),
    )
    with pytest.raises(DeliverySkipped):
        await adapter.send(outbound())


@pytest.mark.parametrize(
    ("code", "message"),
    [(551, "This person isn't available right now."), (190, "Invalid OAuth access token - Cannot parse access token")],
)
async def test_permanent_errors_are_not_retryable(
    api: FakePlatform, adapter: MessengerAdapter, code: int, message: str
) -> None:
    api.fail_next(SEND_PATH, graph_error(400, code, message))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    error = caught.value
    assert not error.retryable and not isinstance(error, DeliverySkipped)
    assert str(code) in error.reason and message in error.reason
    assert PAGE_TOKEN not in str(error)


async def test_token_echoed_by_the_platform_is_scrubbed(api: FakePlatform, adapter: MessengerAdapter) -> None:
    api.fail_next(SEND_PATH, graph_error(400, 190, f"Malformed access token {PAGE_TOKEN}"))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert PAGE_TOKEN not in str(caught.value) and "code 190" in caught.value.reason


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_connection_errors_are_retryable_and_never_show_the_token(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    adapter = make_adapter(f"http://127.0.0.1:{free_port()}")
    await adapter.start(http)
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert caught.value.retryable
    assert caught.value.__cause__ is None  # the aiohttp error may print the URL with the token
    assert PAGE_TOKEN not in str(caught.value)
    assert PAGE_TOKEN not in caplog.text


async def test_timeouts_are_retryable_and_never_show_the_token(
    api: FakePlatform, adapter: MessengerAdapter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(messenger, "REQUEST_TIMEOUT_S", 0.1)
    api.fail_next(SEND_PATH, Answer(delay_s=1.0))
    with pytest.raises(DeliveryError) as caught:
        await adapter.send(outbound())
    assert caught.value.retryable
    assert PAGE_TOKEN not in str(caught.value)
    assert PAGE_TOKEN not in caplog.text


async def test_a_connection_error_names_the_host_never_the_token(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket() as bound:  # bound, never listening: the connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        adapter = make_adapter(f"http://127.0.0.1:{port}")
        await adapter.start(http)
        with pytest.raises(DeliveryError) as caught:
            await adapter.send(outbound())
        await adapter.aclose()
    assert caught.value.retryable and f"cannot connect to 127.0.0.1:{port}" in caught.value.reason
    assert caught.value.__cause__ is None
    assert PAGE_TOKEN not in str(caught.value) and PAGE_TOKEN not in caplog.text


# -- lifecycle ---------------------------------------------------------------------------------


async def test_send_before_start_or_after_close_is_retryable(http: aiohttp.ClientSession) -> None:
    adapter = make_adapter("http://127.0.0.1:9")
    with pytest.raises(DeliveryError) as before:
        await adapter.send(outbound())
    await adapter.start(http)
    await adapter.aclose()
    await adapter.aclose()  # idempotent
    with pytest.raises(DeliveryError) as after:
        await adapter.send(outbound())
    assert before.value.retryable and after.value.retryable
    assert not http.closed  # the shared session belongs to the app


def test_repr_shows_no_secret() -> None:
    assert PAGE_TOKEN not in repr(make_adapter()) and APP_SECRET not in repr(make_adapter())


def test_registry_builds_the_adapter() -> None:
    from channels.registry import create_adapter

    clock: Callable[[], float] = lambda: NOW  # noqa: E731
    assert isinstance(create_adapter(make_endpoint(), clock=clock), MessengerAdapter)
