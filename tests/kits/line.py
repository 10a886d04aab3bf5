"""LINE: webhooks signed as LINE signs them (x-line-signature, Base64 of HMAC-SHA256 of the raw
body; line-bot-sdk only verifies), reply and push on a fake Messaging API.

The kit's reply tokens name their conversation (``rt.<conversation>.<event id>.<attempt>``, as
``tests/test_crash.py``'s LINE fake reads them), so a reply's conversation is known."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.base import Inbound, Kit

SECRET = "e2e-line-channel-secret"
TOKEN = "e2e-line-access-token"
REPLY = "/v2/bot/message/reply"
PUSH = "/v2/bot/message/push"
BYE = "bye"
SENT_BODY = {"sentMessages": [{"id": "461230966842064897", "quoteToken": "q"}]}


def sign(body: bytes, secret: str = SECRET) -> str:
    """As LINE signs: Base64(HMAC-SHA256(channel secret, raw body))."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def new_event_id() -> str:
    return f"01E2E{uuid.uuid4().hex[:20].upper()}"


def reply_token(conversation: str, event_id: str, attempt: int = 0) -> str:
    return f"rt.{conversation}.{event_id}.{attempt}"


def source_of(conversation: str, user: str) -> dict[str, Any]:
    """A ``C...`` conversation is a group, ``R...`` a room, anything else the user's own chat."""
    if conversation.startswith("C"):
        return {"type": "group", "groupId": conversation, "userId": user}
    if conversation.startswith("R"):
        return {"type": "room", "roomId": conversation, "userId": user}
    return {"type": "user", "userId": user}


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
    event_id = event_id or new_event_id()
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


def payload_of(*events: dict[str, Any]) -> dict[str, Any]:
    return {"destination": "Ubot", "events": list(events)}


def body_of(*events: dict[str, Any]) -> bytes:
    return json.dumps(payload_of(*events)).encode()


def texts(request: RecordedRequest) -> list[str]:
    """The texts of one reply or push request."""
    return [m["text"] for m in request.json()["messages"]]


def retry_key_of(request: RecordedRequest) -> str:
    """The push's X-Line-Retry-Key, asserted present and a UUID (as LINE requires)."""
    key = request.headers.get("X-Line-Retry-Key")
    assert key is not None, "push without X-Line-Retry-Key"
    uuid.UUID(key)
    return key


# -- the fake LINE API with LINE's once-rules -----------------------------------------------------


@dataclass(slots=True)
class Delivery:
    """One message that reached a LINE user."""

    via: str  # "reply" or "push"
    to: str
    text: str
    key: str  # the reply token, or the push's X-Line-Retry-Key
    at: float


@dataclass(slots=True)
class LineApi:
    """Reply tokens are made by ``reply_token`` and name their user, so a reply's recipient is
    known. ``hold(to, text)`` -> seconds to sit on an accepted request before answering;
    ``fail(to, text)`` -> a status to answer instead of accepting (nothing is delivered)."""

    deliveries: list[Delivery] = field(default_factory=list)
    used_tokens: set[str] = field(default_factory=set)
    accepted_keys: set[str] = field(default_factory=set)
    repeated_keys: list[str] = field(default_factory=list)  # pushes answered 409
    refused_tokens: list[str] = field(default_factory=list)  # replies answered 400
    failed: list[tuple[str, str, list[str]]] = field(default_factory=list)  # answered by ``fail``
    hold: Callable[[str, str], float] = lambda _to, _text: 0.0
    fail: Callable[[str, str], int | None] = lambda _to, _text: None

    def install(self, fake: FakePlatform) -> None:
        fake.respond(REPLY, self._reply)
        fake.respond(PUSH, self._push)

    def _answer(self, via: str, to: str, texts: list[str], key: str) -> Answer:
        failure = max((self.fail(to, text) or 0 for text in texts), default=0)
        if failure:
            self.failed.append((via, to, texts))
            return Answer(status=failure, json_body={"message": "An error occurred in the backend"})
        if via == "reply":
            if key in self.used_tokens:
                self.refused_tokens.append(key)
                return Answer(status=400, json_body={"message": "Invalid reply token"})
            self.used_tokens.add(key)
        else:
            if key in self.accepted_keys:
                self.repeated_keys.append(key)
                return Answer(status=409, json_body={"message": "The retry key is already accepted"})
            self.accepted_keys.add(key)
        for text in texts:
            self.deliveries.append(Delivery(via, to, text, key, time.time()))
        return Answer(json_body=SENT_BODY, delay_s=max(self.hold(to, text) for text in texts))

    def _reply(self, request: RecordedRequest) -> Answer:
        body = request.json()
        token = body["replyToken"]
        return self._answer("reply", token.split(".")[1], [m["text"] for m in body["messages"]], token)

    def _push(self, request: RecordedRequest) -> Answer:
        body = request.json()
        key = request.headers.get("X-Line-Retry-Key", "")
        assert key, "push without X-Line-Retry-Key"
        return self._answer("push", body["to"], [m["text"] for m in body["messages"]], key)

    def delivered(self, text: str, to: str | None = None) -> list[Delivery]:
        return [d for d in self.deliveries if d.text == text and (to is None or d.to == to)]


@asynccontextmanager
async def line_api_with_once_rules() -> AsyncIterator[tuple[FakePlatform, LineApi]]:
    """The fake LINE API answering as ``LineApi`` does (``tests/test_crash.py``, overload)."""
    async with FakePlatform() as fake:
        line = LineApi()
        line.install(fake)
        yield fake, line


class LineKit(Kit):
    platform = "line"
    endpoint_name = "ln"
    credentials = {"channel_secret": SECRET, "channel_access_token": TOKEN}
    signature_header = "x-line-signature"
    reply_path = REPLY  # with the event's reply token
    notice_path = PUSH  # and replies whose token is gone
    text_limit = 5000  # UTF-16 code units
    own_forged_cases = ("wrong-base64",)
    malformed_bodies = {
        "not-json": b"{not json",
        "array": b"[]",
        "string": b'"events"',
        "no-events": b"{}",
        "events-object": b'{"events": {}}',
        "events-null": b'{"events": null}',
        "empty": b"",
        "deeply-nested": b"[" * 100_000,
    }

    def text(
        self, text: str, *, conversation: str | None = None, user: str | None = None, event_id: str | None = None
    ) -> Inbound:
        conversation = conversation or user or self.conversations[0]
        user = user or conversation
        event_id = event_id or new_event_id()
        event = text_event(
            text,
            event_id=event_id,
            reply_token=reply_token(conversation, event_id),
            source=source_of(conversation, user),
        )
        payload = payload_of(event)
        return Inbound(payload, json.dumps(payload).encode(), conversation)

    def redelivery(self, inbound: Inbound) -> Inbound:
        """The same ``webhookEventId``, marked ``isRedelivery``, with a new reply token."""
        events = []
        for event in inbound.payload["events"]:
            attempt = int(event["replyToken"].rsplit(".", 1)[1]) + 1
            token = reply_token(inbound.conversation, event["webhookEventId"], attempt)
            events.append({**event, "deliveryContext": {"isRedelivery": True}, "replyToken": token})
        payload = payload_of(*events)
        return Inbound(payload, json.dumps(payload).encode(), inbound.conversation)

    def sign(self, body: bytes, url: str, *, secret: str | None = None) -> dict[str, str]:
        return {self.signature_header: sign(body, secret or SECRET)}

    def forge(self, case: str, inbound: Inbound, url: str) -> tuple[bytes, dict[str, str]]:
        if case == "wrong-base64":  # well-formed Base64, not the HMAC
            return inbound.body, {self.signature_header: "bm90IGEgc2lnbmF0dXJl"}
        return super().forge(case, inbound, url)

    def install(self, api: FakePlatform) -> None:
        api.respond(REPLY, self.sent())
        api.respond(PUSH, self.sent())

    def sent(self) -> Answer:
        return Answer(json_body=SENT_BODY)

    def server_error(self) -> Answer:
        return Answer(status=500, json_body={"message": "internal error"})

    def rate_limited(self, retry_after_s: int) -> Answer:
        return Answer(
            status=429, json_body={"message": "Too Many Requests"}, headers={"Retry-After": str(retry_after_s)}
        )

    def texts_of(self, request: RecordedRequest) -> list[tuple[str, str]]:
        body = request.json()
        if request.path == PUSH:
            conversation = body["to"]
        else:
            parts = body["replyToken"].split(".")
            assert len(parts) == 4 and parts[0] == "rt", f"reply token {body['replyToken']!r} is not the kit's"
            conversation = parts[1]
        return [(conversation, m["text"]) for m in body["messages"]]

    def check_reply(self, request: RecordedRequest, answering: Inbound, text: str) -> None:
        assert (request.method, request.path) == ("POST", REPLY)
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        tokens = [event["replyToken"] for event in answering.payload["events"]]
        assert request.json()["replyToken"] in tokens  # the token of the event answered
        assert request.json()["messages"] == [{"type": "text", "text": text}]
        assert "X-Line-Retry-Key" not in request.headers  # a reply takes no retry key

    def check_notice(self, request: RecordedRequest, conversation: str, text: str) -> None:
        assert (request.method, request.path) == ("POST", PUSH)
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        body = request.json()
        assert body["to"] == conversation
        assert body["messages"] == [{"type": "text", "text": text}]
        retry_key_of(request)


LINE = LineKit()
