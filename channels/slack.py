"""Slack Events API in, ``chat.postMessage`` out: slack-sdk's own verifier, and one lean HTTP/1.1 POST.

Inbound: the signature is checked with the SDK's ``SignatureVerifier``, then the body is read
by ``channels.slack_parse`` (which also owns the conversation ids: ``<channel>``, or
``<channel>:<thread_ts>`` inside a thread). Replies to a top-level message go to the channel,
replies in a thread stay in that thread.

Text passes through unchanged both ways: inbound text is Slack's own markup (``&lt;``,
``<@U123>``), and replies are posted as Slack mrkdwn, so an echo round-trips exactly.

Replies and notices are posted on the endpoint's own keep-alive connections to the API
(``channels.http1``), not through slack-sdk's ``AsyncWebClient`` (kept for ``auth.test`` at
start) nor through aiohttp's session: measured under load (bench/ingest.py with py-spy), the
SDK's path held the GIL for ~28% of the gateway's samples, building debug strings whenever its
logger's own level is unset, copying headers and wrapping the answer; aiohttp's
``ClientSession.post`` then still took a third of the loop's samples, ~200 us per post, against
~65 us on ``Http1Client``. The lean path keeps the SDK's semantics: JSON body with the bot token as a bearer,
connection errors retried once after ``CONNECTION_RETRY_S`` (what the SDK's
``AsyncConnectionErrorRetryHandler`` did), nothing else retried here, and every answer judged
as the SDK did (``_answer_error``).

What slack-sdk 3.47 does that this module works around (``auth.test``):

- ``AsyncBaseClient`` copies HTTPS_PROXY/HTTP_PROXY into a per-request ``proxy=`` and ignores
  NO_PROXY, so a test's 127.0.0.1 API would go through the proxy. The attribute is reset after
  construction; proxying is then the shared session's business (``trust_env`` honours NO_PROXY).
- With a shared session the SDK's ``timeout`` is not applied per request: each call is bounded
  here with ``asyncio.timeout``.
- Errors are not uniform: a 2xx that is not JSON raises ``SlackApiError`` whose ``response`` is
  the raw ``aiohttp.ClientResponse`` (``.status``, not ``.status_code``), and a 200 ``text/plain``
  raises ``AttributeError`` from ``AsyncSlackResponse.validate``. ``_api_error`` reads both shapes.
- The default retry handlers retry connection errors once and nothing else (no 429 or 5xx
  retry): pinned explicitly so that the outbox stays the one place that schedules retries.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import aiohttp
import orjson
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler
from slack_sdk.signature import Clock, SignatureVerifier
from slack_sdk.version import __version__ as slack_sdk_version
from slack_sdk.web.async_client import AsyncWebClient

from channels.base import ParsedWebhook, Progress, WebhookRequest, WebhookResponse, send_parts
from channels.http1 import Answer, ConnectionFailed, Http1Client, Http1Error
from channels.slack_parse import read_payload, split_conversation
from channels.text import retry_after_s, split_text
from gateway.errors import BadPayload, BadSignature, ConfigError, DeliveryError, DeliverySkipped
from gateway.models import OutboundMessage
from gateway.settings import EndpointSettings

logger = logging.getLogger(__name__)

DEFAULT_API_BASE_URL = "https://slack.com"
SIGNATURE_HEADER = "X-Slack-Signature"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
# Slack truncates text beyond 40 000 characters and advises at most 4 000 per message; cut
# below that, leaving room for characters Slack counts as more than one.
MAX_TEXT_CHARS = 3500
REQUEST_TIMEOUT_S = 10.0
CONNECTION_RETRY_S = 0.5  # one retry of a connection error, after this long (as slack-sdk's handler)
# ok:false codes that a later attempt can cure; any other code is permanent (channel_not_found,
# not_in_channel, is_archived, invalid_auth, account_inactive, token_revoked, msg_too_long, ...).
RETRYABLE_ERRORS = frozenset({"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"})


# -- the adapter ------------------------------------------------------------------------------


class _State(StrEnum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class _AdapterClock(Clock):
    """The verifier's clock, reading the adapter's (tests move time through it)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock()


class SlackAdapter:
    """One Slack app (endpoint): verifies and parses its Events API calls, posts replies."""

    channel = "slack"

    def __init__(self, endpoint: EndpointSettings, *, clock: Callable[[], float] = time.time) -> None:
        signing_secret = endpoint.credential("signing_secret")
        if not signing_secret.strip():
            raise ConfigError([f"endpoints.{endpoint.name}.credentials.signing_secret: required for slack"])
        self._endpoint = endpoint
        self._clock = clock
        self._verifier = SignatureVerifier(signing_secret, clock=_AdapterClock(clock))
        self._base_url = (endpoint.api_base_url or DEFAULT_API_BASE_URL).rstrip("/") + "/api/"
        self._bot_user_id: str | None = endpoint.credential("bot_user_id") or None
        self._state = _State.NEW
        self._client: AsyncWebClient | None = None
        self._poster: Http1Client | None = None
        self._post_head = b""
        token = endpoint.credential("bot_token")
        self._post_headers = {
            "Content-Type": "application/json;charset=utf-8",
            "User-Agent": f"chat-gateway slack-sdk/{slack_sdk_version}",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        }

    def __repr__(self) -> str:
        return f"SlackAdapter(endpoint={self._endpoint.name!r}, bot_user_id={self._bot_user_id!r}, {self._state})"

    @property
    def bot_user_id(self) -> str | None:
        """Our own bot user (from credentials or ``auth.test``); its messages are ignored."""
        return self._bot_user_id

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Create the API client on the shared session; learn our bot user if not configured."""
        if self._state is _State.CLOSED:
            raise RuntimeError("SlackAdapter is closed")
        if self._state is _State.RUNNING:
            return
        client = AsyncWebClient(
            token=self._endpoint.credential("bot_token") or None,
            base_url=self._base_url,
            session=http,
            timeout=int(REQUEST_TIMEOUT_S),
            retry_handlers=[AsyncConnectionErrorRetryHandler(max_retry_count=1)],
            logger=logging.getLogger(f"{__name__}.sdk"),
        )
        client.proxy = None  # see the module docstring: the session decides about proxies
        poster = Http1Client(self._base_url)
        self._post_head = poster.prepare("POST", "chat.postMessage", self._post_headers)
        self._client, self._poster, self._state = client, poster, _State.RUNNING
        if self._bot_user_id is None:
            await self._learn_bot_user(client)

    async def aclose(self) -> None:
        # The aiohttp session is shared and owned by the app: only forget it.
        self._client = None
        if self._poster is not None:
            await self._poster.aclose()
            self._poster = None
        self._state = _State.CLOSED

    async def _learn_bot_user(self, client: AsyncWebClient) -> None:
        """One ``auth.test``; on failure our own messages are still dropped by their ``bot_id``."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                response = await client.auth_test()
        except (SlackClientError, aiohttp.ClientError, TimeoutError, AttributeError) as exc:
            reason = _failure_of(exc).reason
            logger.warning("slack endpoint %s: auth.test failed (%s); bot user unknown", self._endpoint.name, reason)
            return
        user_id = response.get("user_id")
        if isinstance(user_id, str) and user_id:
            self._bot_user_id = user_id
        else:
            logger.warning("slack endpoint %s: auth.test returned no user_id", self._endpoint.name)

    # -- inbound -----------------------------------------------------------------------------

    def handshake(self, request: WebhookRequest) -> WebhookResponse:
        """Slack has no GET handshake (url_verification is a signed POST)."""
        raise BadPayload("slack webhooks are POST only")

    def parse_webhook(self, request: WebhookRequest) -> ParsedWebhook:
        """Verify the signature and timestamp over the raw body, then read the one event.

        Retries (``X-Slack-Retry-Num``) carry the same event; the dedup key is channel + ``ts``.
        """
        self._verify_signature(request)
        return read_payload(request.body, self._bot_user_id)

    def _verify_signature(self, request: WebhookRequest) -> None:
        timestamp = _header(request.headers, TIMESTAMP_HEADER)
        signature = _header(request.headers, SIGNATURE_HEADER)
        if timestamp is None or signature is None:
            raise BadSignature(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
        try:
            valid = self._verifier.is_valid(body=request.body, timestamp=timestamp, signature=signature)
        except (ValueError, TypeError) as exc:
            # ValueError: a non-numeric timestamp or a body that is not UTF-8; TypeError:
            # hmac.compare_digest refuses a signature header with non-ASCII characters.
            raise BadSignature("malformed timestamp, signature or body") from exc
        if valid is not True:
            raise BadSignature("wrong signature or timestamp more than 300 s away")

    # -- outbound ----------------------------------------------------------------------------

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """Post ``message.text`` to the conversation's channel (and thread), in parts of at most
        ``MAX_TEXT_CHARS``, in order, from part ``message.parts_sent`` on
        (``channels.base.send_parts``)."""
        channel, thread_ts = split_conversation(message.conversation)
        if not channel:
            raise DeliveryError(f"slack: no channel in conversation {message.conversation!r}", retryable=False)
        if not message.text.strip():
            raise DeliverySkipped("empty text")
        poster = self._poster
        if poster is None:  # not started, or closed (aclose forgets it)
            raise DeliveryError("slack adapter is not running", retryable=True)
        parts = split_text(message.text, MAX_TEXT_CHARS, prefer_line_breaks=True)
        post = functools.partial(self._send_part, poster, channel, thread_ts, message.conversation, len(parts))
        await send_parts(message, parts, post, progress)

    async def _send_part(
        self,
        poster: Http1Client,
        channel: str,
        thread_ts: str | None,
        conversation: str,
        total: int,
        index: int,
        text: str,
    ) -> None:
        try:
            await self._post(poster, channel, thread_ts, text)
        except DeliveryError as exc:
            logger.warning(
                "slack send on %s to %s failed (part %d/%d): %s",
                self._endpoint.name,
                conversation,
                index + 1,
                total,
                exc.reason,
            )
            raise

    async def _post(self, poster: Http1Client, channel: str, thread_ts: str | None, text: str) -> None:
        """One ``chat.postMessage``; raises ``DeliveryError`` unless Slack answered ``ok``."""
        fields = {"channel": channel, "text": text}
        if thread_ts is not None:
            fields["thread_ts"] = thread_ts
        body = orjson.dumps(fields)
        try:
            try:
                answer = await poster.request(self._post_head, body, REQUEST_TIMEOUT_S)
            except ConnectionFailed:
                # Refused, reset, or closed before an answer: retried once, as slack-sdk's
                # handler did. A timeout is the outbox's to retry, as when the SDK's call timed out.
                await asyncio.sleep(CONNECTION_RETRY_S)
                answer = await poster.request(self._post_head, body, REQUEST_TIMEOUT_S)
        except (Http1Error, TimeoutError) as exc:
            raise _failure_of(exc) from exc
        error = _answer_error(answer)
        if error is not None:
            raise error


# -- helpers ----------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header, case-insensitively also when ``headers`` is a plain dict."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def _failure_of(exc: BaseException) -> DeliveryError:
    """Our DeliveryError for what the SDK or aiohttp raised. Reasons never hold the token:
    they are built from status codes, Slack error codes and aiohttp's texts (host and port)."""
    if isinstance(exc, SlackApiError):
        return _api_error(exc.response)
    if isinstance(exc, aiohttp.ClientResponseError):  # a session with raise_for_status
        return _status_error(exc.status, None, exc.headers)
    if isinstance(exc, Http1Error | aiohttp.ClientError | TimeoutError):
        detail = str(exc) or "timeout"
        return DeliveryError(f"slack: {type(exc).__name__}: {detail}", retryable=True)
    if isinstance(exc, AttributeError):  # a 200 that is not JSON (see the module docstring)
        return DeliveryError("slack: unexpected response", retryable=False)
    return DeliveryError(f"slack: {type(exc).__name__}", retryable=False)


def _answer_error(answer: Answer) -> DeliveryError | None:
    """None for a 200 whose JSON says ``ok``; else the error, judged as slack-sdk did: a body
    that is not a JSON object carries no error code, so only its status tells."""
    status, headers, raw = answer.status, answer.headers, answer.body
    try:
        data = orjson.loads(raw) if raw else None
    except ValueError:  # UnicodeDecodeError is a ValueError
        data = None
    if not isinstance(data, dict):
        data = None
    if status == 200 and data is not None and data.get("ok"):
        return None
    error = data.get("error") if data is not None else None
    return _status_error(status, error if isinstance(error, str) else None, headers)


def _api_error(response: Any) -> DeliveryError:
    """The error of an answer: an ``AsyncSlackResponse``, or a raw ``aiohttp.ClientResponse``."""
    status = getattr(response, "status_code", None) or getattr(response, "status", None) or 0
    data = getattr(response, "data", None)
    error = data.get("error") if isinstance(data, dict) else None
    return _status_error(int(status), error if isinstance(error, str) else None, getattr(response, "headers", None))


def _status_error(status: int, error: str | None, headers: Mapping[str, str] | None) -> DeliveryError:
    if status == 429 or error == "ratelimited":
        wait_s = retry_after_s(headers.get("Retry-After") if headers is not None else None)
        return DeliveryError(error or "ratelimited", retryable=True, retry_after_s=wait_s)
    if status >= 500:
        return DeliveryError(f"slack: HTTP {status}" + (f": {error}" if error else ""), retryable=True)
    if error is not None:
        return DeliveryError(error, retryable=error in RETRYABLE_ERRORS)
    return DeliveryError(f"slack: HTTP {status}: unexpected response", retryable=False)
