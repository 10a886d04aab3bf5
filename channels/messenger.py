"""Facebook Messenger: the verification handshake, signed webhooks and the Send API.

No official Python SDK: the Send API is called on the endpoint's own keep-alive connections
(``channels.http1``, a few times cheaper per request than aiohttp's session).
The conversation id is the user's page-scoped id (PSID). See CHANNELS.md, "Facebook Messenger".

The page access token travels in the URL query (``?access_token=``), so nothing here logs or
raises with a URL: logs name the path only and error reasons are scrubbed of the token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from channels.base import (
    ParsedWebhook,
    Progress,
    WebhookRequest,
    WebhookResponse,
    number_or_none,
    platform_time,
    send_parts,
    shallow,
)
from channels.http1 import Http1Client, Http1Error
from channels.text import retry_after_s, split_text
from gateway.errors import BadPayload, BadSignature, DeliveryError, DeliverySkipped, Forbidden
from gateway.models import EventKind, InboundEvent, JSONDict, MessageKind, OutboundMessage
from gateway.settings import EndpointSettings

logger = logging.getLogger(__name__)

DEFAULT_API_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_TEXT_CHARS = 2000
MESSAGING_WINDOW_S = 24 * 3600.0
REQUEST_TIMEOUT_S = 10.0
# Graph API error codes worth retrying: 1/2 temporary API errors, 4/17/32/613 rate limits,
# 1200 "temporary send message failure".
RETRYABLE_CODES = frozenset({1, 2, 4, 17, 32, 613, 1200})
OUTSIDE_WINDOW_CODE = 10
OUTSIDE_WINDOW_SUBCODE = 2018278

_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


# -- pure predicates on one ``entry[].messaging[]`` item (S16 housekeeping) -------------------


def is_echo(item: Mapping[str, Any]) -> bool:
    """Our own send, echoed back to the page."""
    message = item.get("message")
    return isinstance(message, Mapping) and message.get("is_echo") is True


def is_user_message(item: Mapping[str, Any]) -> bool:
    """A message the user wrote (text or not), as opposed to an echo of ours."""
    return isinstance(item.get("message"), Mapping) and not is_echo(item)


def is_postback(item: Mapping[str, Any]) -> bool:
    """A tap on a button (postback), an interaction like a message."""
    return isinstance(item.get("postback"), Mapping)


def is_interaction(item: Mapping[str, Any]) -> bool:
    """User messages and postbacks open and extend sessions; delivery, read, reactions,
    echoes and everything else are housekeeping (S16)."""
    return is_user_message(item) or is_postback(item)


def classify_error(status: int, body: Any, retry_after_s: float | None) -> DeliveryError:
    """The ``DeliveryError`` for a non-2xx Send API answer (``body`` is the decoded JSON, if any)."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    subcode = error.get("error_subcode")
    message = str(error.get("message") or "")
    reason = f"messenger: HTTP {status}"
    if code is not None:
        reason += f", code {code}" + (f"/{subcode}" if subcode is not None else "")
    if message:
        reason += f": {message}"
    if status >= 500 or status == 429 or code in RETRYABLE_CODES or error.get("is_transient") is True:
        return DeliveryError(reason, retryable=True, retry_after_s=retry_after_s)
    if code == OUTSIDE_WINDOW_CODE or subcode == OUTSIDE_WINDOW_SUBCODE or "(#10)" in message:
        return DeliverySkipped(f"outside the 24 h messaging window ({reason})", refused_by_platform=True)
    # 551 user unavailable, 190 bad token, 100 bad parameter, other 4xx: retrying cannot help.
    return DeliveryError(reason, retryable=False)


# -- the adapter ------------------------------------------------------------------------------


class MessengerAdapter:
    """One Messenger page (endpoint): verifies and parses its webhooks, sends to its users."""

    channel = "messenger"

    def __init__(self, endpoint: EndpointSettings, *, clock: Callable[[], float] = time.time) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self._poster: Http1Client | None = None
        self._closed = False
        self._base = (endpoint.api_base_url or DEFAULT_API_BASE_URL).rstrip("/")
        self._path = f"/{endpoint.credential('api_version') or DEFAULT_API_VERSION}/me/messages"
        self._head: tuple[str, bytes] = ("", b"")  # (token, the request head carrying it)

    def __repr__(self) -> str:
        return f"MessengerAdapter(endpoint={self._endpoint.name!r}, path={self._path!r})"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Open the Send API's connection pool (the shared session is not used)."""
        if self._poster is None:
            self._poster = Http1Client(self._base)
        self._closed = False

    async def aclose(self) -> None:
        if self._poster is not None:
            await self._poster.aclose()
            self._poster = None
        self._closed = True

    # -- inbound -----------------------------------------------------------------------------

    def handshake(self, request: WebhookRequest) -> WebhookResponse:
        """Meta's subscription check: echo ``hub.challenge`` when ``hub.verify_token`` matches."""
        mode = request.query.get("hub.mode")
        token = request.query.get("hub.verify_token")
        challenge = request.query.get("hub.challenge")
        if mode is None or token is None or challenge is None:
            # CHANNELS.md: 200 with the challenge when the token matches, 403 otherwise.
            raise Forbidden("expected hub.mode, hub.verify_token and hub.challenge")
        expected = self._endpoint.credential("verify_token")
        if mode != "subscribe" or not expected or not hmac.compare_digest(token.encode(), expected.encode()):
            raise Forbidden("wrong verify token")
        return WebhookResponse(200, text=challenge)

    def parse_webhook(self, request: WebhookRequest) -> ParsedWebhook:
        """Verify ``X-Hub-Signature-256`` over the raw body, then turn every messaging item of
        every entry into an event (interactions) or a count (housekeeping), ordered by time."""
        self._verify_signature(request)
        try:
            payload = json.loads(request.body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadPayload("body is not JSON") from exc
        if not isinstance(payload, dict) or payload.get("object") != "page":
            raise BadPayload('expected an object with "object": "page"')
        entries = payload.get("entry")
        if not isinstance(entries, list):
            raise BadPayload('expected an "entry" list')
        parsed = ParsedWebhook(response=WebhookResponse(200, text="EVENT_RECEIVED"))
        for entry in entries:
            if not isinstance(entry, dict):
                parsed.ignored += 1
                continue
            parsed.ignored += _housekeeping_count(entry)
            # Each item stands alone: one the gateway cannot handle (a sender with only
            # ``user_ref``, no usable timestamp, an unknown kind) is counted and dropped, and
            # the rest of the batch is still answered (Meta would redeliver it all otherwise).
            for item in _messaging_items(entry):
                event = _event_of(item) if isinstance(item, dict) and is_interaction(item) else None
                if event is None:
                    parsed.ignored += 1
                else:
                    parsed.events.append(event)
        # Meta does not guarantee order within or across entries.
        parsed.events.sort(key=lambda event: event.timestamp or 0.0)
        return parsed

    def _verify_signature(self, request: WebhookRequest) -> None:
        header = request.headers.get(SIGNATURE_HEADER)
        if header is None:
            raise BadSignature(f"missing {SIGNATURE_HEADER}")
        algorithm, _, given = header.strip().partition("=")
        if algorithm.lower() != "sha256" or not _HEX_SHA256.fullmatch(given):
            raise BadSignature(f"malformed {SIGNATURE_HEADER}")
        secret = self._endpoint.credential("app_secret")
        if not secret:
            raise BadSignature("no app_secret configured")
        expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, given.lower()):
            raise BadSignature("wrong signature")

    # -- outbound ----------------------------------------------------------------------------

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """Send ``message.text`` to the PSID, in parts of at most 2000 characters, from part
        ``message.parts_sent`` on (``channels.base.send_parts``).

        Free-form messages (replies and notices alike) are allowed only within 24 h of the
        user's last message: outside it, or when that time is unknown, ``DeliverySkipped``.
        """
        last_seen = message.user_last_seen_at
        if last_seen is None or self._clock() - last_seen > MESSAGING_WINDOW_S:
            raise DeliverySkipped("outside the 24 h messaging window")
        if not message.text.strip():
            raise DeliverySkipped("empty text")
        poster = self._poster
        if poster is None:
            raise DeliveryError("messenger adapter is not running", retryable=True)
        token = self._endpoint.credential("page_access_token")
        if not token:
            raise DeliveryError("messenger: no page_access_token configured", retryable=False)
        parts = split_text(message.text, MAX_TEXT_CHARS)
        post = functools.partial(self._send_part, poster, token, message, len(parts))
        await send_parts(message, parts, post, progress)

    async def _send_part(
        self, poster: Http1Client, token: str, message: OutboundMessage, total: int, index: int, text: str
    ) -> None:
        body = {
            "recipient": {"id": message.conversation},
            "messaging_type": "RESPONSE" if message.kind is MessageKind.REPLY else "UPDATE",
            "message": {"text": text},
        }
        try:
            await self._post(poster, token, body)
        except DeliveryError as exc:
            logger.warning("messenger send to %s failed (part %d/%d): %s", self._path, index + 1, total, exc.reason)
            raise

    def _request_head(self, poster: Http1Client, token: str) -> bytes:
        """The Send API request's head for ``token`` (prepared again only when it changes)."""
        if self._head[0] != token:
            path = f"{self._path}?access_token={quote(token, safe='')}"
            self._head = (token, poster.prepare("POST", path, {"Content-Type": "application/json"}))
        return self._head[1]

    async def _post(self, poster: Http1Client, token: str, body: JSONDict) -> None:
        try:
            answer = await poster.request(self._request_head(poster, token), orjson.dumps(body), REQUEST_TIMEOUT_S)
        except (Http1Error, TimeoutError) as exc:
            # Errors name the host only, never the URL; scrubbed anyway, and not chained (a
            # logged traceback would show what the original carried).
            detail = _scrub(str(exc), token) or "timeout"
            raise DeliveryError(f"messenger: {type(exc).__name__}: {detail}", retryable=True) from None
        if 200 <= answer.status < 300:
            return
        raw, status = answer.body, answer.status
        wait_s = retry_after_s(answer.headers.get("Retry-After"))
        try:
            decoded: Any = json.loads(_scrub(raw.decode("utf-8", "replace"), token))
        except (ValueError, RecursionError):
            decoded = None
        raise classify_error(status, decoded, wait_s)


# -- parsing helpers --------------------------------------------------------------------------


def _messaging_items(entry: Mapping[str, Any]) -> list[Any]:
    """The ``messaging`` items of one entry (possibly absent; a non-list counts as one item)."""
    items = entry.get("messaging", [])
    return items if isinstance(items, list) else [items]


def _housekeeping_count(entry: Mapping[str, Any]) -> int:
    """Items of an entry outside ``messaging``: ``standby`` (another app holds the thread) and
    ``changes`` (page feed) are housekeeping, counted and dropped."""
    return sum(len(value) for key in ("standby", "changes") if isinstance(value := entry.get(key), list))


def _event_of(item: Mapping[str, Any]) -> InboundEvent | None:
    """The event of a user message or postback item; None when it lacks a sender id, a
    numeric timestamp or (for a message) a mid."""
    sender = item.get("sender")
    psid = sender.get("id") if isinstance(sender, dict) else None
    if isinstance(psid, int) and not isinstance(psid, bool):
        psid = str(psid)
    if not isinstance(psid, str) or not psid:
        return None  # e.g. the checkbox plugin's ``sender.user_ref``: no PSID to answer
    timestamp_ms = number_or_none(item.get("timestamp"))
    if timestamp_ms is None:
        return None
    timestamp = timestamp_ms / 1000
    if is_postback(item):
        postback: Mapping[str, Any] = item["postback"]
        mid = _str_or_none(postback.get("mid"))
        return InboundEvent(
            conversation=psid,
            kind=EventKind.POSTBACK,
            dedup_key=mid or f"postback:{psid}:{item.get('timestamp')}",
            message_id=mid,
            text=_str_or_none(postback.get("title")),
            attachments=({"type": "postback", "payload": shallow(postback.get("payload"))},),
            timestamp=platform_time(timestamp),
        )
    message: Mapping[str, Any] = item["message"]
    mid = _str_or_none(message.get("mid"))
    if mid is None:
        return None
    raw_attachments = message.get("attachments")
    raw_attachments = raw_attachments if isinstance(raw_attachments, list) else []
    attachments = [shallow(att) for att in raw_attachments if isinstance(att, dict)]
    for attachment in attachments:
        attachment.setdefault("type", "unknown")
    quick_reply = message.get("quick_reply")
    if isinstance(quick_reply, dict):
        attachments.append({"type": "quick_reply", "payload": shallow(quick_reply.get("payload"))})
    return InboundEvent(
        conversation=psid,
        kind=EventKind.MESSAGE,
        dedup_key=mid,
        message_id=mid,
        text=_str_or_none(message.get("text")),
        attachments=tuple(attachments),
        timestamp=platform_time(timestamp),
    )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text
