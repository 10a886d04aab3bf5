"""channels.slack: signed Events API requests in, chat.postMessage out (against FakePlatform)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from slack_sdk.signature import SignatureVerifier

import channels.slack as slack
from channels.base import WebhookRequest
from channels.registry import Channel, create_adapter
from channels.slack import SlackAdapter
from channels.slack_parse import conversation_of, is_user_message, split_conversation
from gateway.errors import BadPayload, BadSignature, ConfigError, DeliveryError, DeliverySkipped
from gateway.models import EventKind, OutboundMessage
from gateway.settings import EndpointSettings, Secret
from tests.fakeplatform import Answer, FakePlatform
from tests.gateway_process import free_port
from tests.outbound import outbound_message

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy"
BOT_USER = "U0BOTBOTBOT"
NOW = 1_700_000_000.0
POST_PATH = "/api/chat.postMessage"
AUTH_PATH = "/api/auth.test"

# -- realistic event samples (shapes from Slack's Events API docs) ----------------------------

MESSAGE: dict[str, Any] = {
    "type": "message",
    "channel": "C2147483705",
    "user": "U2147483697",
    "text": "Hello world",
    "ts": "1355517523.000005",
    "event_ts": "1355517523.000005",
    "channel_type": "channel",
}
THREAD_REPLY = {
    **MESSAGE,
    "text": "a reply",
    "ts": "1355517600.000100",
    "event_ts": "1355517600.000100",
    "thread_ts": "1355517523.000005",
    "parent_user_id": "U2147483697",
}
THREAD_PARENT = {**MESSAGE, "thread_ts": MESSAGE["ts"], "reply_count": 1}
DIRECT_MESSAGE = {**MESSAGE, "channel": "D024BE91L", "channel_type": "im"}
MESSAGE_CHANGED = {
    "type": "message",
    "subtype": "message_changed",
    "hidden": True,
    "channel": "C2147483705",
    "ts": "1358878755.000001",
    "message": {"type": "message", "user": "U2147483697", "text": "Hello, world!", "ts": "1355517523.000005"},
}
BOT_MESSAGE = {
    "type": "message",
    "subtype": "bot_message",
    "channel": "C2147483705",
    "bot_id": "B0BOTBOT",
    "text": "beep",
    "ts": "1358877455.000010",
}
APP_MESSAGE_WITH_USER = {**MESSAGE, "user": "U0OTHERAPP", "bot_id": "B0OTHERAPP", "app_id": "A0OTHER"}
CHANNEL_JOIN = {
    "type": "message",
    "subtype": "channel_join",
    "channel": "C2147483705",
    "user": "U2147483697",
    "text": "<@U2147483697> has joined the channel",
    "ts": "1358877458.000011",
}
FILE_SHARE = {
    "type": "message",
    "subtype": "file_share",
    "channel": "C2147483705",
    "user": "U2147483697",
    "text": "",
    "ts": "1358877460.000012",
    "files": [{"id": "F0FILE", "name": "report.pdf", "mimetype": "application/pdf", "url_private": "https://x"}],
}
THREAD_BROADCAST = {**THREAD_REPLY, "subtype": "thread_broadcast"}
OWN_MESSAGE = {**MESSAGE, "user": BOT_USER}
APP_MENTION = {
    "type": "app_mention",
    "channel": "C2147483705",
    "user": "U2147483697",
    "text": f"<@{BOT_USER}> hi",
    "ts": "1355517523.000005",
    "event_ts": "1355517523.000005",
}
REACTION_ADDED = {"type": "reaction_added", "user": "U2147483697", "reaction": "thumbsup", "event_ts": "1.2"}


def callback(event: dict[str, Any], event_id: str = "Ev0PV52K21") -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": "T0001",
        "api_app_id": "A0MYAPP",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1355517523,
        "event": event,
    }


# -- helpers ----------------------------------------------------------------------------------


def make_endpoint(*, api_base_url: str | None = None, bot_user_id: str = BOT_USER) -> EndpointSettings:
    credentials = {"signing_secret": Secret(SIGNING_SECRET), "bot_token": Secret(BOT_TOKEN)}
    if bot_user_id:
        credentials["bot_user_id"] = Secret(bot_user_id)
    return EndpointSettings(
        name="slack-main",
        channel=Channel.SLACK,
        path="/webhooks/slack-main",
        api_base_url=api_base_url,
        credentials=credentials,
    )


def make_adapter(*, clock: Callable[[], float] = lambda: NOW, **kwargs: Any) -> SlackAdapter:
    return SlackAdapter(make_endpoint(**kwargs), clock=clock)


def request(body: bytes, headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest(
        method="POST",
        path="/webhooks/slack-main",
        query={},
        public_url="https://bots.example.com/webhooks/slack-main",
        headers=CIMultiDictProxy(CIMultiDict(headers)),
        body=body,
        content_type="application/json",
    )


def signed(payload: Any, *, timestamp: str | None = None, secret: str = SIGNING_SECRET) -> WebhookRequest:
    """A request signed with slack-sdk's own signer, as Slack would send it."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    timestamp = timestamp if timestamp is not None else str(int(NOW))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    assert signature is not None
    return request(body, {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature})


def outbound(conversation: str, text: str = "hi there", key: str = "reply:Ev0PV52K21:0") -> OutboundMessage:
    return outbound_message("slack-main", "slack", conversation, text, key=key, created_at=NOW)


@pytest.fixture
async def api() -> AsyncIterator[FakePlatform]:
    async with FakePlatform() as platform:
        platform.respond(POST_PATH, Answer(json_body={"ok": True, "channel": "C1", "ts": "1700000000.000200"}))
        platform.respond(AUTH_PATH, Answer(json_body={"ok": True, "user_id": BOT_USER, "bot_id": "B0BOTBOT"}))
        yield platform


@pytest.fixture
async def adapter(api: FakePlatform, http: aiohttp.ClientSession) -> AsyncIterator[SlackAdapter]:
    started = make_adapter(api_base_url=api.url)
    await started.start(http)
    yield started
    await started.aclose()


# -- pure predicates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "bot_user_id", "expected"),
    [
        (MESSAGE, BOT_USER, True),
        (DIRECT_MESSAGE, BOT_USER, True),
        (THREAD_REPLY, BOT_USER, True),
        (THREAD_PARENT, BOT_USER, True),
        (FILE_SHARE, BOT_USER, True),
        (THREAD_BROADCAST, BOT_USER, True),
        (MESSAGE_CHANGED, BOT_USER, False),
        (BOT_MESSAGE, BOT_USER, False),
        (APP_MESSAGE_WITH_USER, BOT_USER, False),
        (CHANNEL_JOIN, BOT_USER, False),
        (OWN_MESSAGE, BOT_USER, False),
        (OWN_MESSAGE, None, True),  # bot user unknown: only bot_id can tell
        ({**OWN_MESSAGE, "bot_id": "B0BOTBOT"}, None, False),
        (APP_MENTION, BOT_USER, True),
        (REACTION_ADDED, BOT_USER, False),
        ({**MESSAGE, "user": None}, BOT_USER, False),
        ({k: v for k, v in MESSAGE.items() if k != "channel"}, BOT_USER, False),
    ],
)
def test_is_user_message(event: dict[str, Any], bot_user_id: str | None, expected: bool) -> None:
    assert is_user_message(event, bot_user_id) is expected


@pytest.mark.parametrize(
    ("event", "conversation"),
    [
        (MESSAGE, "C2147483705"),
        (DIRECT_MESSAGE, "D024BE91L"),
        (THREAD_REPLY, "C2147483705:1355517523.000005"),
        (THREAD_BROADCAST, "C2147483705:1355517523.000005"),
        (THREAD_PARENT, "C2147483705"),
        (FILE_SHARE, "C2147483705"),
    ],
)
def test_conversation_of(event: dict[str, Any], conversation: str) -> None:
    assert conversation_of(event) == conversation


@pytest.mark.parametrize(
    ("conversation", "parts"),
    [
        ("C123", ("C123", None)),
        ("C123:1700000000.000100", ("C123", "1700000000.000100")),
        ("D024BE91L", ("D024BE91L", None)),
        ("C123:", ("C123", None)),
    ],
)
def test_split_conversation(conversation: str, parts: tuple[str, str | None]) -> None:
    assert split_conversation(conversation) == parts
    assert split_conversation(conversation_of({**MESSAGE, **_thread_of(conversation)})) == parts


def _thread_of(conversation: str) -> dict[str, str]:
    channel, _, thread_ts = conversation.partition(":")
    return {"channel": channel, "thread_ts": thread_ts} if thread_ts else {"channel": channel}


# -- signature verification -------------------------------------------------------------------


def test_valid_signature_is_accepted() -> None:
    parsed = make_adapter().parse_webhook(signed(callback(MESSAGE)))
    assert len(parsed.events) == 1
    assert parsed.response.status == 200
    assert parsed.response.text == ""


@pytest.mark.parametrize(
    "make_request",
    [
        pytest.param(lambda: signed(callback(MESSAGE), secret="not-the-secret"), id="forged"),
        pytest.param(
            lambda: request(json.dumps(callback(MESSAGE)).encode(), {"X-Slack-Request-Timestamp": str(int(NOW))}),
            id="no-signature",
        ),
        pytest.param(
            lambda: request(
                json.dumps(callback(MESSAGE)).encode(),
                {"X-Slack-Signature": signed(callback(MESSAGE)).headers["X-Slack-Signature"]},
            ),
            id="no-timestamp",
        ),
        pytest.param(lambda: request(json.dumps(callback(MESSAGE)).encode(), {}), id="no-headers"),
        pytest.param(lambda: signed(callback(MESSAGE), timestamp="yesterday"), id="non-numeric-timestamp"),
        pytest.param(lambda: signed(callback(MESSAGE), timestamp="1700000000.5"), id="fractional-timestamp"),
        pytest.param(lambda: signed(callback(MESSAGE), timestamp=str(int(NOW) - 301)), id="stale"),
        pytest.param(lambda: signed(callback(MESSAGE), timestamp=str(int(NOW) + 301)), id="future"),
        pytest.param(
            lambda: request(b'{"type": "event_callback", "x": 2}', dict(signed(b'{"type": "event_callback"}').headers)),
            id="tampered-body",
        ),
        pytest.param(lambda: request(b"\xff\xfe not utf-8", dict(signed(b"").headers)), id="binary-body"),
        pytest.param(
            lambda: request(b"not json", {"X-Slack-Request-Timestamp": str(int(NOW)), "X-Slack-Signature": "v0=00"}),
            id="bad-signature-before-body",
        ),
    ],
)
def test_bad_signatures_are_rejected(make_request: Callable[[], WebhookRequest]) -> None:
    with pytest.raises(BadSignature):
        make_adapter().parse_webhook(make_request())


def test_timestamps_within_five_minutes_are_accepted_and_follow_the_adapter_clock() -> None:
    adapter = make_adapter()
    for skew in (-300, -299, 0, 299, 300):
        parsed = adapter.parse_webhook(signed(callback(MESSAGE), timestamp=str(int(NOW) + skew)))
        assert len(parsed.events) == 1
    later = make_adapter(clock=lambda: NOW + 3600)
    with pytest.raises(BadSignature):
        later.parse_webhook(signed(callback(MESSAGE)))


def test_missing_signing_secret_is_a_config_error() -> None:
    endpoint = EndpointSettings(name="slack-main", channel=Channel.SLACK, path="/webhooks/slack-main")
    with pytest.raises(ConfigError, match="signing_secret"):
        SlackAdapter(endpoint)


def test_registry_builds_the_slack_adapter() -> None:
    assert isinstance(create_adapter(make_endpoint(), clock=lambda: NOW), SlackAdapter)


def test_there_is_no_get_handshake() -> None:
    with pytest.raises(BadPayload):
        make_adapter().handshake(request(b"", {}))


# -- payloads ---------------------------------------------------------------------------------


def test_url_verification_answers_the_challenge() -> None:
    payload = {
        "token": "t",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
        "type": "url_verification",
    }
    parsed = make_adapter().parse_webhook(signed(payload))
    assert parsed.events == []
    assert parsed.ignored == 0
    assert parsed.response.status == 200
    assert parsed.response.text == payload["challenge"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'{"event": {}}', id="no-type"),
        pytest.param(b'{"type": 7}', id="type-not-a-string"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
        pytest.param(json.dumps({"type": "url_verification"}).encode(), id="no-challenge"),
        pytest.param(json.dumps({"type": "event_callback", "event_id": "Ev1"}).encode(), id="no-event"),
        pytest.param(json.dumps({**callback(MESSAGE), "event_id": None}).encode(), id="no-event-id"),
    ],
)
def test_bodies_that_cannot_be_slack_payloads_are_bad_payloads(body: bytes) -> None:
    with pytest.raises(BadPayload):
        make_adapter().parse_webhook(signed(body))


def test_user_message_becomes_an_event_of_the_channel() -> None:
    parsed = make_adapter().parse_webhook(signed(callback(MESSAGE, event_id="Ev0PV52K21")))
    assert parsed.ignored == 0
    (event,) = parsed.events
    assert event.conversation == "C2147483705"
    assert event.kind is EventKind.MESSAGE
    assert event.dedup_key == "C2147483705:1355517523.000005"  # channel + ts (one event per mention)
    assert event.message_id == "1355517523.000005"
    assert event.text == "Hello world"
    assert event.attachments == ()
    assert event.timestamp == 1355517523.000005


def test_thread_reply_is_its_own_conversation() -> None:
    (event,) = make_adapter().parse_webhook(signed(callback(THREAD_REPLY, event_id="Ev2"))).events
    assert event.conversation == "C2147483705:1355517523.000005"
    assert event.message_id == "1355517600.000100"


def test_file_share_is_a_message_with_attachments_and_no_text() -> None:
    (event,) = make_adapter().parse_webhook(signed(callback(FILE_SHARE, event_id="Ev3"))).events
    assert event.kind is EventKind.MESSAGE
    assert event.text is None
    assert event.attachments == ({"type": "file", "name": "report.pdf", "mimetype": "application/pdf"},)
    assert event.timestamp == 1358877460.000012  # no event_ts: the message ts


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(callback(MESSAGE_CHANGED), id="message_changed"),
        pytest.param(callback(BOT_MESSAGE), id="bot_message"),
        pytest.param(callback(APP_MESSAGE_WITH_USER), id="other-app"),
        pytest.param(callback(CHANNEL_JOIN), id="channel_join"),
        pytest.param(callback(OWN_MESSAGE), id="own-message"),
        pytest.param(callback(REACTION_ADDED), id="reaction_added"),
        pytest.param({"token": "t", "team_id": "T1", "minute_rate_limited": 1518467820, "type": "app_rate_limited"}),
    ],
)
def test_housekeeping_is_counted_and_dropped(payload: dict[str, Any]) -> None:
    parsed = make_adapter().parse_webhook(signed(payload))
    assert parsed.events == []
    assert parsed.ignored == 1
    assert parsed.response.status == 200


def test_a_redelivery_carries_the_same_dedup_key() -> None:
    adapter = make_adapter()
    first = adapter.parse_webhook(signed(callback(MESSAGE, event_id="Ev9")))
    retry = signed(callback(MESSAGE, event_id="Ev9"))
    retry = request(
        retry.body, {**dict(retry.headers), "X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    )
    second = adapter.parse_webhook(retry)
    assert first.events[0].dedup_key == second.events[0].dedup_key == "C2147483705:1355517523.000005"


def test_app_mention_is_a_user_message_with_the_dedup_key_of_its_message_twin() -> None:
    adapter = make_adapter()
    (mention,) = adapter.parse_webhook(signed(callback(APP_MENTION, event_id="EvMENTION"))).events
    (twin,) = adapter.parse_webhook(signed(callback({**MESSAGE, "text": APP_MENTION["text"]}, event_id="EvMSG"))).events
    assert mention.kind is EventKind.MESSAGE and mention.conversation == "C2147483705"
    assert mention.dedup_key == twin.dedup_key


# -- start: our own bot user ------------------------------------------------------------------


async def test_auth_test_is_called_once_at_start_and_its_user_is_ignored(
    api: FakePlatform, http: aiohttp.ClientSession
) -> None:
    adapter = make_adapter(api_base_url=api.url, bot_user_id="")
    assert adapter.parse_webhook(signed(callback(OWN_MESSAGE))).events != []  # not known yet
    await adapter.start(http)
    await adapter.start(http)  # a second start does nothing
    assert adapter.bot_user_id == BOT_USER
    (call,) = api.to(AUTH_PATH)
    assert call.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    parsed = adapter.parse_webhook(signed(callback(OWN_MESSAGE)))
    assert (parsed.events, parsed.ignored) == ([], 1)
    assert len(adapter.parse_webhook(signed(callback(MESSAGE))).events) == 1
    await adapter.aclose()


async def test_configured_bot_user_skips_auth_test(adapter: SlackAdapter, api: FakePlatform) -> None:
    assert adapter.bot_user_id == BOT_USER
    assert api.to(AUTH_PATH) == []


async def test_failed_auth_test_does_not_stop_start(api: FakePlatform, http: aiohttp.ClientSession) -> None:
    api.respond(AUTH_PATH, Answer(json_body={"ok": False, "error": "invalid_auth"}))
    adapter = make_adapter(api_base_url=api.url, bot_user_id="")
    await adapter.start(http)
    assert adapter.bot_user_id is None
    assert len(api.to(AUTH_PATH)) == 1
    # Our own messages still carry bot_id and are dropped by it.
    parsed = adapter.parse_webhook(signed(callback({**OWN_MESSAGE, "bot_id": "B0BOTBOT"})))
    assert (parsed.events, parsed.ignored) == ([], 1)
    await adapter.send(outbound("C1"))  # sending still works
    await adapter.aclose()


# -- send -------------------------------------------------------------------------------------


async def test_send_to_a_channel_posts_json_with_the_bot_token(adapter: SlackAdapter, api: FakePlatform) -> None:
    await adapter.send(outbound("C2147483705", "Hello back"))
    (call,) = api.to(POST_PATH)
    assert call.method == "POST"
    assert call.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert call.headers["Content-Type"].startswith("application/json")
    assert call.json() == {"channel": "C2147483705", "text": "Hello back"}


async def test_send_to_a_thread_posts_in_the_thread(adapter: SlackAdapter, api: FakePlatform) -> None:
    await adapter.send(outbound("C2147483705:1355517523.000005", "in the thread"))
    (call,) = api.to(POST_PATH)
    assert call.json() == {"channel": "C2147483705", "text": "in the thread", "thread_ts": "1355517523.000005"}


async def test_long_text_is_sent_in_parts_in_order(adapter: SlackAdapter, api: FakePlatform) -> None:
    text = " ".join(f"word{i:05d}" for i in range(1500))  # ~15 000 characters
    await adapter.send(outbound("C1", text))
    sent = [call.json()["text"] for call in api.to(POST_PATH)]
    assert len(sent) > 1
    assert all(len(part) <= slack.MAX_TEXT_CHARS for part in sent)
    assert "".join(sent) == text  # the space at a cut ends the earlier part


async def test_long_text_is_cut_at_line_breaks(adapter: SlackAdapter, api: FakePlatform) -> None:
    lines = [f"line {i:04d} " + "x " * 40 for i in range(200)]  # a space closer to each limit than a line break
    text = "\n".join(lines)
    await adapter.send(outbound("C1", text))
    sent = [call.json()["text"] for call in api.to(POST_PATH)]
    assert len(sent) > 1
    assert all(len(part) <= slack.MAX_TEXT_CHARS for part in sent)
    assert all(part.endswith("\n") for part in sent[:-1])
    assert "".join(sent) == text


async def test_a_retry_resumes_after_the_parts_already_posted(adapter: SlackAdapter, api: FakePlatform) -> None:
    text = "a" * 3000 + " " + "b" * 3000 + " " + "c" * 3000
    api.fail_next(POST_PATH, Answer(json_body={"ok": True}), Answer(status=503, text="busy"))
    message = outbound("C1", text)
    reported: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:  # as the outbox does, which also stores it
        reported.append((done, total))
        message.parts_sent = done

    with pytest.raises(DeliveryError) as failed:
        await adapter.send(message, progress)
    assert failed.value.retryable
    assert reported == [(1, 3)]
    await adapter.send(message, progress)
    sent = [call.json()["text"][0] for call in api.to(POST_PATH)]
    assert sent == ["a", "b", "b", "c"]
    assert reported == [(1, 3), (2, 3), (3, 3)]


async def test_rate_limit_is_retryable_after_retry_after(adapter: SlackAdapter, api: FakePlatform) -> None:
    api.fail_next(
        POST_PATH, Answer(status=429, json_body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": "7"})
    )
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert failed.value.retryable
    assert failed.value.retry_after_s == 7
    assert len(api.to(POST_PATH)) == 1  # the SDK did not retry by itself


@pytest.mark.parametrize(
    "code",
    [
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_auth",
        "account_inactive",
        "token_revoked",
        "msg_too_long",
        "no_text",
        "some_future_error",
    ],
)
async def test_ok_false_errors_are_permanent(adapter: SlackAdapter, api: FakePlatform, code: str) -> None:
    api.fail_next(POST_PATH, Answer(json_body={"ok": False, "error": code}))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert failed.value.reason == code
    assert not failed.value.retryable


@pytest.mark.parametrize(
    ("answer", "retry_after_s"),
    [
        pytest.param(Answer(json_body={"ok": False, "error": "ratelimited"}), None, id="ok-false-ratelimited"),
        pytest.param(Answer(json_body={"ok": False, "error": "internal_error"}), None, id="internal_error"),
        pytest.param(Answer(status=429, text="slow down"), None, id="429-without-retry-after"),
        pytest.param(Answer(status=500, json_body={"ok": False, "error": "fatal_error"}), None, id="500"),
        pytest.param(Answer(status=502, text="<html>bad gateway</html>"), None, id="502-html"),
        pytest.param(Answer(status=503, text="busy", headers={"Retry-After": "3"}), None, id="503"),
    ],
)
async def test_transient_failures_are_retryable(
    adapter: SlackAdapter, api: FakePlatform, answer: Answer, retry_after_s: float | None
) -> None:
    api.fail_next(POST_PATH, answer)
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert failed.value.retryable
    assert failed.value.retry_after_s == retry_after_s
    assert BOT_TOKEN not in failed.value.reason
    assert len(api.to(POST_PATH)) == 1  # no retry by the SDK on 5xx either


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(text="not slack"), id="200-text"),
        pytest.param(Answer(text="<html>", headers={"Content-Type": "application/json"}), id="200-bad-json"),
        pytest.param(Answer(json_body={}), id="200-no-ok"),
        pytest.param(Answer(status=404, text="no such method"), id="404"),
    ],
)
async def test_unexpected_answers_are_permanent_errors(
    adapter: SlackAdapter, api: FakePlatform, answer: Answer
) -> None:
    api.fail_next(POST_PATH, answer)
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert not failed.value.retryable
    assert BOT_TOKEN not in failed.value.reason


async def test_connection_refused_is_retryable(http: aiohttp.ClientSession) -> None:
    adapter = make_adapter(api_base_url=f"http://127.0.0.1:{free_port()}")
    await adapter.start(http)
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert failed.value.retryable
    assert BOT_TOKEN not in failed.value.reason
    await adapter.aclose()


async def test_a_slow_api_times_out_as_retryable(
    adapter: SlackAdapter, api: FakePlatform, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slack, "REQUEST_TIMEOUT_S", 0.2)
    api.fail_next(POST_PATH, Answer(json_body={"ok": True}, delay_s=2.0))
    with pytest.raises(DeliveryError) as failed:
        await adapter.send(outbound("C1"))
    assert failed.value.retryable  # (a second attempt would have met the default answer: not ok, permanent)


async def test_a_connection_dropped_before_the_answer_is_tried_once_more(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As slack-sdk's connection-error handler did: one more attempt, after a short pause."""
    monkeypatch.setattr(slack, "CONNECTION_RETRY_S", 0.01)
    bodies: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1]
        )
        bodies.append(json.loads(await reader.readexactly(length)))
        if len(bodies) > 1:  # the first connection is dropped without an answer
            answer = b'{"ok":true}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        adapter = make_adapter(api_base_url=f"http://127.0.0.1:{port}")
        await adapter.start(http)
        await adapter.send(outbound("C1", "once more"))
        assert [body["text"] for body in bodies] == ["once more", "once more"]
        await adapter.aclose()
    finally:
        server.close()
        await server.wait_closed()


async def test_proxy_variables_do_not_divert_api_calls(
    api: FakePlatform, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    adapter = make_adapter(api_base_url=api.url)
    await adapter.start(http)
    await adapter.send(outbound("C1"))
    assert len(api.to(POST_PATH)) == 1
    await adapter.aclose()


async def test_empty_text_is_skipped_without_a_call(adapter: SlackAdapter, api: FakePlatform) -> None:
    with pytest.raises(DeliverySkipped):
        await adapter.send(outbound("C1", "  \n"))
    assert api.requests == []


async def test_lifecycle(api: FakePlatform, http: aiohttp.ClientSession) -> None:
    adapter = make_adapter(api_base_url=api.url)
    with pytest.raises(DeliveryError) as not_started:
        await adapter.send(outbound("C1"))
    assert not_started.value.retryable
    await adapter.start(http)
    await adapter.send(outbound("C1"))
    await adapter.aclose()
    await adapter.aclose()  # idempotent
    with pytest.raises(DeliveryError):
        await adapter.send(outbound("C1"))
    with pytest.raises(RuntimeError):
        await adapter.start(http)
    assert len(api.to(POST_PATH)) == 1


def test_repr_shows_no_secret() -> None:
    adapter = make_adapter()
    assert BOT_TOKEN not in repr(adapter)
    assert SIGNING_SECRET not in repr(adapter)
