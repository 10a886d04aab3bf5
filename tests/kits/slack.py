"""Slack: Events API callbacks signed with slack-sdk's own signer (v0, with the request
timestamp), chat.postMessage on a fake Web API. A conversation is ``<channel>`` or
``<channel>:<thread_ts>``."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from slack_sdk.signature import SignatureVerifier

from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.base import Inbound, Kit

SIGNING_SECRET = "e2e-slack-signing-secret"
BOT_TOKEN = "xoxb-e2e-bot-token"
BOT_USER = "UBOT"
POST = "/api/chat.postMessage"
AUTH_TEST = "/api/auth.test"
BYE = "bye"
RETRY_HEADERS = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}


def message(
    text: str, *, channel: str = "C1", user: str | None = "U1", thread_ts: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A ``message`` event in ``channel`` (and thread) from ``user``."""
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
    """The ``event_callback`` envelope around one event."""
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
    """X-Slack-Request-Timestamp (now unless given) and X-Slack-Signature, by slack-sdk."""
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}


def posted(request: RecordedRequest) -> dict[str, Any]:
    """The JSON a chat.postMessage request carried."""
    body: dict[str, Any] = request.json()
    return body


class SlackKit(Kit):
    platform = "slack"
    endpoint_name = "sl"
    credentials = {"signing_secret": SIGNING_SECRET, "bot_token": BOT_TOKEN, "bot_user_id": BOT_USER}
    signature_header = "X-Slack-Signature"
    reply_path = POST  # replies and notices alike
    text_limit = 3500
    conversations = ("C1", "C2")
    # Slack's 1 post/s per channel (tests/test_ratelimit.py covers it) is lifted, so that tests
    # answering several messages in one channel do not wait seconds.
    rate_limit = {"per_conversation_per_second": 1000}
    own_forged_cases = (
        "missing-signature",
        "missing-timestamp",
        "wrong-hex",
        "stale-301s",
        "future-301s",
        "non-numeric-timestamp",
        "huge-timestamp",
    )
    malformed_bodies = {
        "not-json": b"{not json",
        "array": b"[]",
        "string": b'"event_callback"',
        "no-type": b"{}",
        "type-not-string": b'{"type": 7}',
        "no-event": b'{"type": "event_callback"}',
        "event-not-object": b'{"type": "event_callback", "event": "message"}',
        "challenge-missing": b'{"type": "url_verification"}',
        "empty": b"",
        "deeply-nested": b"[" * 100_000,
    }

    def without_bot_user_id(self, api_url: str) -> dict[str, Any]:
        """The endpoint without ``bot_user_id``: the adapter asks auth.test at start."""
        entry = self.endpoint(api_url)
        del entry["credentials"]["bot_user_id"]
        return entry

    def text(
        self, text: str, *, conversation: str | None = None, user: str | None = None, event_id: str | None = None
    ) -> Inbound:
        conversation = conversation or self.conversations[0]
        channel, _, thread_ts = conversation.partition(":")
        payload = callback(message(text, channel=channel, user=user or "U1", thread_ts=thread_ts or None), event_id)
        return Inbound(payload, encode(payload), conversation)

    def redelivery(self, inbound: Inbound) -> Inbound:
        """Slack retries the same body (same ``event_id``) with X-Slack-Retry-Num."""
        return Inbound(inbound.payload, inbound.body, inbound.conversation, RETRY_HEADERS)

    def sign(self, body: bytes, url: str, *, secret: str | None = None) -> dict[str, str]:
        return signed_headers(body, secret=secret or SIGNING_SECRET)

    def forge(self, case: str, inbound: Inbound, url: str) -> tuple[bytes, dict[str, str]]:
        body = inbound.body
        now = int(time.time())
        if case == "missing-signature":
            return body, {"X-Slack-Request-Timestamp": str(now)}
        if case == "missing-timestamp":
            return body, {"X-Slack-Signature": signed_headers(body)["X-Slack-Signature"]}
        if case == "wrong-hex":
            return body, {"X-Slack-Request-Timestamp": str(now), "X-Slack-Signature": "v0=" + "0" * 64}
        if case == "stale-301s":
            return body, signed_headers(body, timestamp=str(now - 301))
        if case == "future-301s":
            return body, signed_headers(body, timestamp=str(now + 301))
        if case == "non-numeric-timestamp":
            return body, signed_headers(body, timestamp="yesterday")
        if case == "huge-timestamp":
            return body, signed_headers(body, timestamp="9" * 5000)
        return super().forge(case, inbound, url)

    def install(self, api: FakePlatform) -> None:
        api.respond(POST, self.sent())

    def sent(self) -> Answer:
        return Answer(json_body={"ok": True, "channel": "C1", "ts": "1700000099.000100"})

    def server_error(self) -> Answer:
        return Answer(status=500, json_body={"ok": False, "error": "internal_error"})

    def rate_limited(self, retry_after_s: int) -> Answer:
        return Answer(
            status=429, json_body={"ok": False, "error": "ratelimited"}, headers={"Retry-After": str(retry_after_s)}
        )

    def accepted(self, request: RecordedRequest) -> bool:
        """Slack refuses with a 200 too: ``ok`` decides."""
        answer = request.answer
        return super().accepted(request) and answer is not None and bool(answer.json_body.get("ok"))

    def texts_of(self, request: RecordedRequest) -> list[tuple[str, str]]:
        body = posted(request)
        thread_ts = body.get("thread_ts")
        return [(body["channel"] + (f":{thread_ts}" if thread_ts else ""), body["text"])]

    def check_reply(self, request: RecordedRequest, answering: Inbound, text: str) -> None:
        self.check_notice(request, answering.conversation, text)  # a reply is a post like any other

    def check_notice(self, request: RecordedRequest, conversation: str, text: str) -> None:
        assert (request.method, request.path) == ("POST", POST)
        assert request.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
        channel, _, thread_ts = conversation.partition(":")
        expected = {"channel": channel, "text": text} | ({"thread_ts": thread_ts} if thread_ts else {})
        assert posted(request) == expected


SLACK = SlackKit()
