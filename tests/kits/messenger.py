"""Messenger: page webhooks signed as Meta signs them (X-Hub-Signature-256, HMAC-SHA256 of the
raw bytes; Meta publishes no Python signer), the Send API of a fake Graph API."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.base import Ack, Inbound, Kit

APP_SECRET = "e2e-app-secret"
VERIFY_TOKEN = "e2e-verify-token"
PAGE_TOKEN = "e2e-page-access-token"
PAGE = "PAGE-100"
SEND_PATH = "/v21.0/me/messages"
BYE = "This conversation has ended."


def now_ms() -> int:
    return int(time.time() * 1000)


def text_item(psid: str, text: str, mid: str, ts_ms: int | None = None) -> dict[str, Any]:
    """One ``messaging`` item: a user's text message."""
    return {
        "sender": {"id": psid},
        "recipient": {"id": PAGE},
        "timestamp": ts_ms if ts_ms is not None else now_ms(),
        "message": {"mid": mid, "text": text},
    }


def page_payload(*entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A page webhook: one entry per list of messaging items."""
    return {"object": "page", "entry": [{"id": PAGE, "time": now_ms(), "messaging": items} for items in entries]}


def encode(payload: Any) -> bytes:
    """Meta's serialisation: non-ASCII escaped as \\uXXXX, then signed as is."""
    return json.dumps(payload, ensure_ascii=True).encode("ascii")


def page_body(*entries: list[dict[str, Any]]) -> bytes:
    return encode(page_payload(*entries))


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class MessengerKit(Kit):
    platform = "messenger"
    endpoint_name = "fb"
    credentials = {"app_secret": APP_SECRET, "verify_token": VERIFY_TOKEN, "page_access_token": PAGE_TOKEN}
    signature_header = "X-Hub-Signature-256"
    reply_path = SEND_PATH  # replies (RESPONSE) and notices (UPDATE) alike
    text_limit = 2000
    ack = Ack(200, "text/plain", "EVENT_RECEIVED")
    bare_get_status = 403  # a GET is the verification handshake: no verify token, refused
    bye = BYE
    own_forged_cases = ("zeros", "sha1-only", "not-hex")
    malformed_bodies = {
        "not-json": b"not json",
        "not-utf8": b"\xff\xfe\x00garbage",
        "empty": b"",
        "array": b"[]",
        "other-object": b'{"object": "instagram", "entry": []}',
        "no-entry": b'{"object": "page"}',
        "entry-not-list": b'{"object": "page", "entry": {"id": "x"}}',
        "deeply-nested": b"[" * 50_000 + b"]" * 50_000,
    }
    # Items that each stand alone: the gateway ignores them and answers 200 (DESIGN.md, "Platform
    # payloads as they really come"); tests/test_e2e_messenger.py.
    unhandled_items = {
        "entry-item-not-object": b'{"object": "page", "entry": ["x"]}',
        "messaging-not-list": b'{"object": "page", "entry": [{"messaging": "x"}]}',
        "no-sender": b'{"object": "page", "entry": [{"messaging": [{"timestamp": 1, "message": {"mid": "m", "text": "t"}}]}]}',
        "no-timestamp": b'{"object": "page", "entry": [{"messaging": [{"sender": {"id": "U"}, "message": {"mid": "m"}}]}]}',
        "no-mid": b'{"object": "page", "entry": [{"messaging": [{"sender": {"id": "U"}, "timestamp": 1, "message": {}}]}]}',
    }

    def text(
        self, text: str, *, conversation: str | None = None, user: str | None = None, event_id: str | None = None
    ) -> Inbound:
        psid = user or conversation or self.conversations[0]
        assert conversation in (None, psid), "a Messenger conversation is its user (the PSID)"
        payload = page_payload([text_item(psid, text, event_id or f"m_{uuid.uuid4().hex}")])
        return Inbound(payload, encode(payload), psid)

    def redelivery(self, inbound: Inbound) -> Inbound:
        """Meta may redeliver with a new envelope (entry time, item timestamp): the mid decides."""
        items = [
            dict(item, timestamp=item["timestamp"] + 5) for e in inbound.payload["entry"] for item in e["messaging"]
        ]
        payload = page_payload(items)
        return Inbound(payload, encode(payload), inbound.conversation)

    def sign(self, body: bytes, url: str, *, secret: str | None = None) -> dict[str, str]:
        return {self.signature_header: meta_signature(body, secret or APP_SECRET)}

    def forge(self, case: str, inbound: Inbound, url: str) -> tuple[bytes, dict[str, str]]:
        own = {"zeros": "sha256=" + "0" * 64, "sha1-only": "sha1=" + "0" * 40, "not-hex": "sha256=not-hex"}
        if case in own:
            return inbound.body, {self.signature_header: own[case]}
        return super().forge(case, inbound, url)

    def install(self, api: FakePlatform) -> None:
        api.respond(SEND_PATH, self.sent())

    def sent(self) -> Answer:
        return Answer(json_body={"recipient_id": "ignored", "message_id": "m_sent"})

    def server_error(self) -> Answer:
        return Answer(status=500, json_body={"error": {"message": "oops", "code": 2}})

    def rate_limited(self, retry_after_s: int) -> Answer:
        error = {"message": "(#4) Application request limit reached", "type": "OAuthException", "code": 4}
        return Answer(status=429, json_body={"error": error}, headers={"Retry-After": str(retry_after_s)})

    def texts_of(self, request: RecordedRequest) -> list[tuple[str, str]]:
        body = request.json()
        return [(body["recipient"]["id"], body["message"]["text"])]

    def _check(self, request: RecordedRequest, conversation: str, text: str, messaging_type: str) -> None:
        assert (request.method, request.path) == ("POST", SEND_PATH)
        assert request.query == {"access_token": PAGE_TOKEN}
        assert request.json() == {
            "recipient": {"id": conversation},
            "messaging_type": messaging_type,
            "message": {"text": text},
        }

    def check_reply(self, request: RecordedRequest, answering: Inbound, text: str) -> None:
        self._check(request, answering.conversation, text, "RESPONSE")

    def check_notice(self, request: RecordedRequest, conversation: str, text: str) -> None:
        self._check(request, conversation, text, "UPDATE")


MESSENGER = MessengerKit()
