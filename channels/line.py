"""LINE Messaging API: signed webhooks in, reply or push out. See CHANNELS.md, "LINE".

Inbound: the signature is checked with the SDK's ``SignatureValidator``, then the JSON is read
tolerantly by ``channels.line_parse`` (the SDK's ``WebhookParser`` drops or rejects events with
missing or new fields). The conversation id is the groupId, roomId or userId of the event's source.

Outbound: the SDK's async client (``AsyncMessagingApi``). A reply is free but its token works
once, within about a minute, and takes no retry key; a push costs quota but is idempotent with
``X-Line-Retry-Key``. So only a first attempt with a fresh token replies; closure notices,
retries and late messages push, with a retry key derived from the outbox key, so that every
attempt of one message, also after a restart, carries the same key.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from linebot.v3.messaging import (
    AsyncApiClient,
    AsyncMessagingApi,
    Configuration,
    PushMessageRequest,
    ReplyMessageRequest,
    TextMessage,
)
from linebot.v3.messaging.exceptions import ApiException
from linebot.v3.webhook import SignatureValidator

from channels.base import ParsedWebhook, Progress, WebhookRequest, WebhookResponse, send_parts
from channels.line_parse import to_inbound
from channels.text import split_text
from gateway.errors import BadPayload, BadSignature, DeliveryError, DeliverySkipped, ReplyTokenRejected
from gateway.models import MessageKind, OutboundMessage
from gateway.settings import EndpointSettings

logger = logging.getLogger(__name__)

DEFAULT_API_BASE_URL = "https://api.line.me"
SIGNATURE_HEADER = "x-line-signature"
MAX_TEXT_UNITS = 5000  # LINE's text limit; counted in UTF-16 code units to be safe with emoji
MAX_MESSAGES_PER_REQUEST = 5
REQUEST_TIMEOUT_S = 10.0
RATE_LIMIT_RETRY_S = 1.0  # LINE sends no Retry-After on 429
MAX_CONNECTIONS = 100
# Fixed forever: retry keys must come out the same across restarts and versions.
RETRY_KEY_NAMESPACE = uuid.UUID("db58abf3-d587-4183-8780-581cd4d4f05d")


# -- pure helpers for sending --------------------------------------------------------------------


def retry_key(endpoint: str, key: str, part: int = 0) -> str:
    """The ``X-Line-Retry-Key`` of request ``part`` of one outbox message: the same on every
    attempt and across restarts (LINE keeps it 24 h and answers a repeat with 409)."""
    name = f"{endpoint}:{key}" if part == 0 else f"{endpoint}:{key}:{part}"
    return str(uuid.uuid5(RETRY_KEY_NAMESPACE, name))


def error_message(body: Any) -> str:
    """LINE's ``message`` (and ``details``) from an error body; the raw text when not JSON."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not isinstance(body, str) or not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    if not isinstance(data, dict):
        return body[:300]
    message = str(data.get("message") or "")
    details = data.get("details")
    if isinstance(details, list):
        notes = [
            f"{d.get('property')}: {d.get('message')}" if d.get("property") else str(d.get("message"))
            for d in details
            if isinstance(d, dict)
        ]
        if notes:
            message += " (" + "; ".join(notes) + ")"
    return message[:500]


def is_invalid_reply_token(status: int, message: str) -> bool:
    """LINE refused a reply token (used, expired or unknown): nothing was sent."""
    return status == 400 and "reply token" in message.lower()


def classify_error(status: int, message: str) -> DeliveryError:
    """The ``DeliveryError`` for a non-2xx LINE answer (409 and invalid reply tokens are handled
    by the caller)."""
    reason = f"line: HTTP {status}" + (f": {message}" if message else "")
    if status == 429 and "monthly limit" in message.lower():
        # The quota resets next month: retrying only burns attempts. Dead letter.
        return DeliveryError(f"monthly quota reached ({reason})", retryable=False)
    if status == 429:
        return DeliveryError(reason, retryable=True, retry_after_s=RATE_LIMIT_RETRY_S)
    if status >= 500:
        return DeliveryError(reason, retryable=True)
    # 400 bad request, 401 bad token, 403 not allowed, ...: retrying cannot help.
    return DeliveryError(reason, retryable=False)


def _transport_error(exc: Exception) -> DeliveryError:
    if isinstance(exc, aiohttp.InvalidURL):
        return DeliveryError(f"line: invalid API URL: {exc}", retryable=False)
    if isinstance(exc, TimeoutError):
        return DeliveryError("line: timeout", retryable=True)
    return DeliveryError(f"line: {type(exc).__name__}: {exc}", retryable=True)


# -- the adapter ------------------------------------------------------------------------------


class LineAdapter:
    """One LINE channel (endpoint): verifies and parses its webhooks, replies and pushes."""

    channel = "line"

    def __init__(
        self,
        endpoint: EndpointSettings,
        *,
        clock: Callable[[], float] = time.time,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._base_url = (endpoint.api_base_url or DEFAULT_API_BASE_URL).rstrip("/")
        self._api_client: Any = None  # AsyncApiClient, created in start()
        self._api: Any = None  # AsyncMessagingApi
        self._closed = False
        self._started_at = clock()

    def __repr__(self) -> str:
        return f"LineAdapter(endpoint={self._endpoint.name!r}, api={self._base_url!r})"

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Create the SDK client inside the running loop. ``http`` is not used: the SDK keeps its
        own session (see ``_direct_session``)."""
        if self._closed:
            raise RuntimeError("LineAdapter is closed")
        if self._api_client is not None:
            return
        self._started_at = self._clock()  # messages created before this were pending from a previous run
        config = Configuration(host=self._base_url, access_token=self._endpoint.credential("channel_access_token"))
        client = AsyncApiClient(config)
        await _direct_session(client)
        self._api_client = client
        self._api = AsyncMessagingApi(client)

    async def aclose(self) -> None:
        self._closed = True
        client, self._api_client, self._api = self._api_client, None, None
        if client is not None:
            await client.close()

    # -- inbound -----------------------------------------------------------------------------

    def handshake(self, request: WebhookRequest) -> WebhookResponse:
        raise BadPayload("no GET handshake for LINE")

    def parse_webhook(self, request: WebhookRequest) -> ParsedWebhook:
        """Verify ``x-line-signature`` over the raw body, then read every event of the batch.

        An empty ``events`` list is LINE's connectivity check: 200 and nothing else.
        """
        body = self._verified_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise BadPayload("body is not JSON") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
            raise BadPayload("not a LINE webhook: no events list")
        parsed = ParsedWebhook(response=WebhookResponse(status=200, text=""))
        now = self._clock()
        for item in payload["events"]:
            event = to_inbound(item, now) if isinstance(item, dict) else None
            if event is None:
                parsed.ignored += 1
            else:
                parsed.events.append(event)
        return parsed

    def _verified_body(self, request: WebhookRequest) -> str:
        secret = self._endpoint.credential("channel_secret")
        signature = request.headers.get(SIGNATURE_HEADER)
        if not secret:
            raise BadSignature("no channel_secret configured")
        if not signature:
            raise BadSignature(f"missing {SIGNATURE_HEADER}")
        try:
            body = request.body.decode("utf-8")
            valid = SignatureValidator(secret).validate(body, signature)
        except UnicodeError as exc:  # LINE signs UTF-8 text; anything else is not from LINE
            raise BadSignature("wrong signature") from exc
        if not valid:
            raise BadSignature("wrong signature")
        return body

    # -- outbound ----------------------------------------------------------------------------

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """Reply while the token is fresh, else push (closure notices always push).

        A part here is one request: up to ``MAX_MESSAGES_PER_REQUEST`` texts. A message of one
        request may reply; a longer one pushes request after request from part
        ``message.parts_sent`` on (``channels.base.send_parts``), each with its own retry key.

        A reply carries no retry key, so its repeat is detected by the token instead: a token is
        ours alone and works once, so when LINE refuses a still-fresh token for a message an
        earlier attempt may have sent (a retry after an unclear failure, or a message pending
        from before this process started, i.e. across a crash), that attempt used it: the reply
        was delivered. A refused token on a first attempt falls back to push.

        Raises ``DeliveryError``: retryable for timeouts, connection errors, 5xx and rate limits;
        permanent for other 4xx and the monthly quota. A 409 on push (retry key already accepted)
        means an earlier attempt got through: success.
        """
        api = self._require_api()
        parts = split_text(message.text, MAX_TEXT_UNITS, utf16=True)
        if not parts:
            raise DeliverySkipped("empty text")
        batches = [parts[i : i + MAX_MESSAGES_PER_REQUEST] for i in range(0, len(parts), MAX_MESSAGES_PER_REQUEST)]
        # Only a single-request message replies: a reply carries no retry key, and in a longer
        # message a crash between the reply and its recorded progress would have the next
        # attempt push that first batch again.
        if len(batches) == 1 and message.parts_sent == 0 and self._may_reply(message):
            try:
                await self._reply(api, message.reply_token or "", batches[0])
            except ReplyTokenRejected:
                if self._may_have_sent(message):
                    logger.info(
                        "line %s: reply token of %s already used by an earlier attempt: delivered",
                        self._endpoint.name,
                        message.key,
                    )
                    return
                logger.info("line %s: reply token refused for %s; pushing", self._endpoint.name, message.key)
            else:
                if progress is not None:
                    await progress(1, 1)
                return
        await send_parts(message, batches, functools.partial(self._push, api, message), progress)

    def _may_reply(self, message: OutboundMessage) -> bool:
        return (
            message.kind is not MessageKind.CLOSURE  # closure notices are always pushes
            and bool(message.reply_token)
            and message.reply_token_expires_at is not None
            and self._clock() < message.reply_token_expires_at
        )

    def _may_have_sent(self, message: OutboundMessage) -> bool:
        """An earlier attempt may have reached LINE: a retry, or a message from a previous run."""
        return message.attempts > 0 or message.created_at < self._started_at

    async def _reply(self, api: Any, token: str, texts: list[str]) -> None:
        request = ReplyMessageRequest(reply_token=token, messages=[TextMessage(text=t) for t in texts])
        try:
            await api.reply_message(request, _request_timeout=self._timeout)
        except ApiException as exc:
            status, message = int(exc.status or 0), error_message(exc.body)
            if is_invalid_reply_token(status, message):
                raise ReplyTokenRejected() from exc
            # A 5xx (like a timeout below) may or may not have delivered the reply.
            raise classify_error(status, message) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A reply that timed out may or may not have reached the user. The outbox retries;
            # the retry replies with the same token while it is fresh, and LINE's refusal of a
            # used token tells us the first attempt got through (see send). Only a retry after
            # the token's minute must push blind, and may repeat the text: README names it.
            raise _transport_error(exc) from exc
        except ValueError:
            _log_unparsed_success(self._endpoint.name, "reply")

    async def _push(self, api: Any, message: OutboundMessage, index: int, texts: list[str]) -> None:
        request = PushMessageRequest(to=message.conversation, messages=[TextMessage(text=t) for t in texts])
        key = retry_key(message.endpoint, message.key, index)
        try:
            await api.push_message(request, x_line_retry_key=key, _request_timeout=self._timeout)
        except ApiException as exc:
            status = int(exc.status or 0)
            if status == 409:  # "The retry key is already accepted": an earlier attempt got through
                return
            raise classify_error(status, error_message(exc.body)) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _transport_error(exc) from exc
        except ValueError:
            _log_unparsed_success(self._endpoint.name, "push")

    def _require_api(self) -> Any:
        if self._api is None:
            state = "closed" if self._closed else "not started"
            raise DeliveryError(f"line: adapter {state}", retryable=True)
        return self._api


def _log_unparsed_success(endpoint: str, what: str) -> None:
    # The SDK validates a 2xx body against its response model *after* LINE accepted the
    # request, and raises pydantic's ValidationError (a ValueError) if it does not match (our
    # request models were built before the call, so nothing else raises it). The message went
    # out: report success, never a retry that could repeat it.
    logger.warning("line %s: %s accepted, but LINE's answer did not match the SDK model", endpoint, what)


async def _direct_session(client: Any) -> None:
    """Swap the SDK's aiohttp session for one that ignores the environment.

    The SDK opens ``ClientSession(trust_env=True)``: it would send our calls through
    HTTP(S)_PROXY, read ~/.netrc, and hop to a thread per request to look both up. The rest of
    the gateway ignores the environment (aiohttp's default); LINE does the same, so a proxy
    variable cannot divert the bearer token or break ``api_base_url`` (tests on 127.0.0.1).
    """
    rest = client.rest_client
    sdk_session = rest.pool_manager
    rest.pool_manager = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
        trust_env=False,
    )
    await sdk_session.close()
