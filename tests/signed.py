"""Signed webhook requests as the platforms build them, for tests that post over real HTTP
(to a ``GatewayProcess`` or to a ``TestClient``).

Each ``*_request`` returns a ``SignedRequest``: the raw body and the headers that sign it.
Post it with ``await request.post(http, url)`` (an ``aiohttp.ClientSession``) or pass
``data=request.body, headers=request.headers`` to any client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class SignedRequest:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    async def post(self, http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str]]:
        """POST it; the status and the response headers (raises aiohttp errors as they come)."""
        async with http.post(url, data=self.body, headers=self.headers) as response:
            await response.read()
            return response.status, dict(response.headers)


# -- LINE -------------------------------------------------------------------------------------


def line_signature(body: bytes, channel_secret: str) -> str:
    """As LINE signs: Base64(HMAC-SHA256(channel secret, raw body))."""
    return base64.b64encode(hmac.new(channel_secret.encode(), body, hashlib.sha256).digest()).decode()


def line_text_event(
    user: str,
    text: str,
    *,
    event_id: str | None = None,
    reply_token: str | None = None,
    redelivery: bool = False,
) -> dict[str, Any]:
    """One LINE ``message`` event (text) from ``user``. A redelivery keeps ``event_id`` (the
    ``webhookEventId``) and sets ``deliveryContext.isRedelivery``."""
    event_id = event_id or uuid.uuid4().hex.upper()
    return {
        "type": "message",
        "mode": "active",
        "timestamp": int(time.time() * 1000),
        "source": {"type": "user", "userId": user},
        "webhookEventId": event_id,
        "deliveryContext": {"isRedelivery": redelivery},
        "replyToken": reply_token or f"rt-{event_id}",
        "message": {"id": f"m-{event_id}", "type": "text", "text": text, "quoteToken": f"q-{event_id}"},
    }


def line_request(channel_secret: str, *events: dict[str, Any]) -> SignedRequest:
    body = json.dumps({"destination": "Ubot", "events": list(events)}).encode()
    headers = {"Content-Type": "application/json", "x-line-signature": line_signature(body, channel_secret)}
    return SignedRequest(body, headers)


# -- Messenger --------------------------------------------------------------------------------


def messenger_request(app_secret: str, psid: str, text: str, mid: str | None = None) -> SignedRequest:
    """One page ``messaging`` item from ``psid``, signed with X-Hub-Signature-256."""
    now_ms = int(time.time() * 1000)
    item = {
        "sender": {"id": psid},
        "recipient": {"id": "PAGE"},
        "timestamp": now_ms,
        "message": {"mid": mid or f"m_{uuid.uuid4().hex}", "text": text},
    }
    body = json.dumps({"object": "page", "entry": [{"id": "PAGE", "time": now_ms, "messaging": [item]}]}).encode()
    signature = "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return SignedRequest(body, {"Content-Type": "application/json", "X-Hub-Signature-256": signature})


# -- Slack ------------------------------------------------------------------------------------


def slack_request(
    signing_secret: str, channel: str, user: str, text: str, event_id: str | None = None
) -> SignedRequest:
    """One ``event_callback`` with a channel ``message``, signed as Slack does (v0, timestamp)."""
    ts = f"{time.time():.6f}"
    payload = {
        "token": "legacy",
        "team_id": "T1",
        "api_app_id": "A1",
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "event": {
            "type": "message",
            "channel": channel,
            "user": user,
            "text": text,
            "ts": ts,
            "event_ts": ts,
            "channel_type": "channel",
        },
    }
    body = json.dumps(payload).encode()
    timestamp = str(int(time.time()))
    base = b"v0:" + timestamp.encode() + b":" + body
    signature = "v0=" + hmac.new(signing_secret.encode(), base, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature,
    }
    return SignedRequest(body, headers)


async def post_raw(
    host: str, port: int, path: str, headers: list[bytes], body: bytes, content_type: str = "application/json"
) -> bytes:
    """POST with header bytes sent exactly as given (a client library would refuse non-ASCII
    ones) and return the response's status line."""
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n" % (path.encode(), content_type.encode())
    head += b"Content-Length: %d\r\n" % len(body) + b"".join(h + b"\r\n" for h in headers)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
