"""Twilio Programmable Messaging (SMS): signed form webhooks in, REST API sends out.

Inbound: ``X-Twilio-Signature`` is verified with the SDK's ``RequestValidator`` over the public
URL and every form parameter (a MultiDict, so repeated parameters count) before the form's
fields are used. The signature covers the fields, so this is the one adapter that parses a form,
and only once the request carries a signature and at most ``MAX_FORM_FIELDS`` fields. Status
callbacks (with or without ``Body``), ``OptOutType=HELP`` and Twilio's opt-out / opt-in keywords
are housekeeping (S16): callbacks and HELP are counted and dropped, keywords (``OptOutType``
when present) become ``OPT_OUT`` / ``OPT_IN`` events. The conversation id is the user's number
exactly as Twilio sent it in ``From`` (E.164).

Outbound: ``twilio.rest.Client`` over ``AsyncTwilioHttpClient`` (aiohttp, never the blocking
requests client). Facts about twilio 9.13 this module relies on or works around:

- The message URL is ``client.api.base_url`` + ``/2010-04-01/Accounts/{sid}/Messages.json``; edge
  and region would rewrite the host (they are read from ``TWILIO_EDGE``/``TWILIO_REGION`` too),
  so they are cleared.
- ``AsyncTwilioHttpClient`` retries nothing unless given ``max_retries`` (it is not), follows no
  redirects, and its aiohttp session has ``trust_env=False``: no proxy variables apply.
- It ignores its own ``timeout`` and passes ``timeout=None`` to aiohttp, which means *no* timeout
  at all; each call is therefore bounded here with ``asyncio.timeout``.
- Error answers raise ``TwilioRestException`` or, for RFC 9457 bodies, ``TwilioServiceException``
  (not a subclass); neither carries the response headers, so ``Retry-After`` is captured with an
  aiohttp trace hook into a per-task holder.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from multidict import MultiDict
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from channels.base import ParsedWebhook, Progress, WebhookRequest, WebhookResponse, send_parts
from channels.text import retry_after_s, split_text
from gateway.errors import BadPayload, BadSignature, ConfigError, DeliveryError, DeliverySkipped
from gateway.models import EventKind, InboundEvent, JSONDict, OutboundMessage
from gateway.settings import EndpointSettings

log = logging.getLogger(__name__)

DEFAULT_API_BASE_URL = "https://api.twilio.com"
SIGNATURE_HEADER = "X-Twilio-Signature"
TWIML_EMPTY = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
MAX_BODY_CHARS = 1600  # Twilio's limit on one message body (error 21617 beyond it)
DEFAULT_SEND_TIMEOUT_S = 15.0

OPT_OUT_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
OPT_IN_KEYWORDS = frozenset({"START", "YES", "UNSTOP"})
# ``OptOutType`` values: HELP is answered by Twilio itself, so it is housekeeping here (None).
OPT_OUT_TYPES: dict[str, EventKind | None] = {"STOP": EventKind.OPT_OUT, "START": EventKind.OPT_IN}
OPT_OUT_TYPE_HELP = "HELP"
INBOUND_STATUSES = frozenset({"received", "receiving"})
# Twilio's own webhooks carry a few dozen fields; a form with more is not Twilio's (DESIGN.md).
MAX_FORM_FIELDS = 1000

# Twilio error codes with a fixed meaning for delivery.
CODE_UNSUBSCRIBED = 21610  # the recipient sent STOP: never retry
CODE_TOO_MANY_REQUESTS = 20429
_PERMANENT_CODES = {21211: "invalid 'To' number", 21614: "'To' is not a mobile number", 20003: "authentication failed"}


def is_status_callback(form: Mapping[str, str]) -> bool:
    """A delivery status callback, not a user message: it carries ``MessageStatus`` (a
    Messaging Service's callback may also carry our own ``Body``, and ``From`` = our number).

    Inbound messages carry ``SmsStatus=received`` and no ``MessageStatus``; any other
    ``SmsStatus`` (``sent``, ``delivered``, ...) is a callback too.
    """
    if "MessageStatus" in form:
        return True
    status = form.get("SmsStatus")
    return status is not None and status.strip().lower() not in INBOUND_STATUSES


def opt_keyword(body: str, opt_out_type: str | None = None) -> EventKind | None:
    """``OPT_OUT`` / ``OPT_IN`` for Twilio's opt-out and opt-in keywords, else None.

    ``OptOutType`` is authoritative when Twilio sends it (custom keywords of Advanced Opt-Out
    in any language); without it, or with a value we do not know, the default keywords count.
    """
    kind = OPT_OUT_TYPES.get((opt_out_type or "").strip().upper())
    if kind is not None:
        return kind
    word = body.strip().upper()
    if word in OPT_OUT_KEYWORDS:
        return EventKind.OPT_OUT
    if word in OPT_IN_KEYWORDS:
        return EventKind.OPT_IN
    return None


def _form_of(request: WebhookRequest) -> MultiDict[str]:
    """The form's fields, at most ``MAX_FORM_FIELDS`` (more: ``BadPayload``, counted on the raw
    bytes before anything is decoded, so an unsigned flood of fields costs nothing)."""
    if request.form is not None:
        if len(request.form) > MAX_FORM_FIELDS:
            raise BadPayload(f"twilio form with more than {MAX_FORM_FIELDS} fields")
        return MultiDict(request.form.items())  # items() of a MultiDict(Proxy) keeps repeats
    if request.body.count(b"&") >= MAX_FORM_FIELDS:
        raise BadPayload(f"twilio form with more than {MAX_FORM_FIELDS} fields")
    # Whatever the Content-Type: a body that is not a form is still verified (and rejected)
    # the same way.
    return MultiDict(parse_qsl(request.body.decode("utf-8", errors="replace"), keep_blank_values=True))


def _attachments(form: Mapping[str, str], num_media: int) -> tuple[JSONDict, ...]:
    attachments: list[JSONDict] = []
    # Bounded by the form's size: a forged huge NumMedia cannot make this loop long.
    for i in range(min(num_media, len(form))):
        url = form.get(f"MediaUrl{i}")
        if url:
            attachments.append({"type": "media", "url": url, "content_type": form.get(f"MediaContentType{i}", "")})
    return tuple(attachments)


@dataclass(slots=True)
class _Answer:
    """What the last HTTP answer of the current task said (filled by the trace hook)."""

    status: int | None = None
    retry_after: str | None = None


_ANSWER: contextvars.ContextVar[_Answer | None] = contextvars.ContextVar("twilio_answer", default=None)


async def _on_request_end(
    _session: aiohttp.ClientSession, _ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    answer = _ANSWER.get()
    if answer is not None:
        answer.status = params.response.status
        answer.retry_after = params.response.headers.get("Retry-After")


class _State(Enum):
    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


class TwilioAdapter:
    """One Twilio endpoint: credentials ``account_sid``, ``auth_token``, ``from_number``."""

    channel = "twilio"

    def __init__(
        self,
        endpoint: EndpointSettings,
        *,
        clock: Callable[[], float] = time.time,
        send_timeout_s: float = DEFAULT_SEND_TIMEOUT_S,
    ) -> None:
        self._endpoint = endpoint
        self._clock = clock
        self._send_timeout_s = send_timeout_s
        self._validator = RequestValidator(endpoint.credential("auth_token"))
        self._state = _State.UNOPENED
        self._http_client: Any = None
        self._client: Any = None

    def __repr__(self) -> str:
        return f"TwilioAdapter(endpoint={self._endpoint.name!r}, state={self._state.value})"

    # -- inbound -----------------------------------------------------------------------------

    def handshake(self, request: WebhookRequest) -> WebhookResponse:
        """Twilio has no GET handshake."""
        raise BadPayload("twilio webhooks have no GET handshake")

    def parse_webhook(self, request: WebhookRequest) -> ParsedWebhook:
        """Verify ``X-Twilio-Signature`` over the public URL and the form, then read the form.

        The signature covers the form's fields, so they are parsed first, but only once the
        request carries a signature and at most ``MAX_FORM_FIELDS`` of them.
        """
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            raise BadSignature("missing X-Twilio-Signature")
        # An empty auth token would make every HMAC forgeable: accept nothing then.
        if not self._endpoint.credential("auth_token"):
            raise BadSignature("no auth_token configured")
        form = _form_of(request)
        self._verify(request.public_url, form, signature)
        twiml = WebhookResponse(status=200, text=TWIML_EMPTY, content_type="text/xml")
        message_sid = form.get("MessageSid")
        if not message_sid:
            raise BadPayload("twilio form without MessageSid")
        opt_out_type = form.get("OptOutType")
        if is_status_callback(form) or (opt_out_type or "").strip().upper() == OPT_OUT_TYPE_HELP:
            return ParsedWebhook(ignored=1, response=twiml)
        sender = form.get("From")
        if not sender:
            raise BadPayload("twilio message without From")
        body = form.get("Body", "")
        kind = opt_keyword(body, opt_out_type)
        if kind is not None:
            event = InboundEvent(
                conversation=sender, kind=kind, dedup_key=message_sid, message_id=message_sid, text=body
            )
            return ParsedWebhook(events=[event], response=twiml)
        try:
            num_media = max(int(form.get("NumMedia", "0") or "0"), 0)
        except ValueError:
            raise BadPayload("twilio NumMedia is not a number") from None
        event = InboundEvent(
            conversation=sender,
            kind=EventKind.MESSAGE,
            dedup_key=message_sid,
            message_id=message_sid,
            text=None if body == "" and num_media > 0 else body,
            attachments=_attachments(form, num_media),
        )
        return ParsedWebhook(events=[event], response=twiml)

    def _verify(self, url: str, form: MultiDict[str], signature: str) -> None:
        if not url:
            raise BadSignature("cannot rebuild the URL Twilio signed: malformed Host header")
        try:
            valid = self._validator.validate(url, form, signature)
        except ValueError as exc:  # urllib refuses the URL (a port out of range, a broken [IPv6)
            raise BadSignature("cannot rebuild the URL Twilio signed") from exc
        if not valid:
            raise BadSignature("wrong X-Twilio-Signature")

    # -- outbound ----------------------------------------------------------------------------

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Create the SDK client (it owns its own aiohttp session; ``http`` is not used)."""
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"{self!r} cannot start twice")
        # The SDK falls back to TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN for empty credentials:
        # never let the environment choose the account.
        missing = [key for key in ("account_sid", "auth_token", "from_number") if not self._endpoint.credential(key)]
        if missing:
            raise ConfigError([f"endpoints.{self._endpoint.name}.credentials.{key}: required" for key in missing])
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(_on_request_end)
        self._http_client = AsyncTwilioHttpClient(trace_configs=[trace])
        client = Client(
            self._endpoint.credential("account_sid"),
            self._endpoint.credential("auth_token"),
            http_client=self._http_client,
        )
        client.edge = None  # the SDK reads TWILIO_EDGE / TWILIO_REGION from the environment
        client.region = None
        client.api.base_url = (self._endpoint.api_base_url or DEFAULT_API_BASE_URL).rstrip("/")
        self._client = client
        self._state = _State.OPENED

    async def aclose(self) -> None:
        """Close the SDK's aiohttp session. Safe to call twice."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        http_client, self._http_client, self._client = self._http_client, None, None
        if http_client is not None:
            await http_client.close()

    async def send(self, message: OutboundMessage, progress: Progress | None = None) -> None:
        """Send ``message.text`` to the number ``message.conversation``, in parts of at most
        ``MAX_BODY_CHARS`` UTF-16 code units (``channels.text.split_text``), from part
        ``message.parts_sent`` on (``channels.base.send_parts``).
        """
        if self._state is not _State.OPENED:
            raise DeliveryError(f"twilio adapter is {self._state.value}", retryable=True)
        parts = split_text(message.text, MAX_BODY_CHARS, utf16=True)
        if not parts:
            raise DeliveryError("empty message body", retryable=False)
        first = message.parts_sent
        await send_parts(message, parts, lambda _index, body: self._create(message.conversation, body), progress)
        log.debug("twilio sent %d part(s) to endpoint %s", max(len(parts) - first, 0), self._endpoint.name)

    async def _create(self, to: str, body: str) -> None:
        answer = _Answer()
        token = _ANSWER.set(answer)
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await self._client.messages.create_async(
                    to=to, from_=self._endpoint.credential("from_number"), body=body
                )
        except (TwilioRestException, TwilioServiceException) as exc:
            raise self._api_error(exc.status, _code_of(exc), _message_of(exc), answer) from exc
        except TimeoutError as exc:
            raise DeliveryError(f"twilio timeout after {self._send_timeout_s} s", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"twilio connection error: {type(exc).__name__}", retryable=True) from exc
        except ValueError as exc:
            # The SDK parses a 2xx body as JSON: an unreadable one still means Twilio accepted
            # the message, and retrying would send it twice.
            if answer.status is not None and 200 <= answer.status < 300:
                log.warning("twilio accepted a message with an unreadable answer (%s)", answer.status)
                return
            raise DeliveryError("twilio answered something unreadable", retryable=True) from exc
        finally:
            _ANSWER.reset(token)

    def _api_error(self, status: int, code: int | None, text: str, answer: _Answer) -> DeliveryError:
        # Twilio's own text is kept short and scrubbed: a reason is logged and stored.
        detail = self._scrub(text)[:200]
        wait_s = retry_after_s(answer.retry_after, self._clock())
        if code == CODE_UNSUBSCRIBED:
            return DeliverySkipped(f"{CODE_UNSUBSCRIBED}: recipient opted out", refused_by_platform=True)
        if status == 429 or code == CODE_TOO_MANY_REQUESTS:
            return DeliveryError(f"twilio rate limited ({status}, {code})", retryable=True, retry_after_s=wait_s)
        if status >= 500:
            return DeliveryError(f"twilio {status}: {detail}", retryable=True, retry_after_s=wait_s)
        if code in _PERMANENT_CODES:
            return DeliveryError(f"{code}: {_PERMANENT_CODES[code]}", retryable=False)
        return DeliveryError(f"twilio {status} ({code}): {detail}", retryable=False)

    def _scrub(self, text: str) -> str:
        token = self._endpoint.credential("auth_token")
        return text.replace(token, "***") if token else text


def _code_of(exc: TwilioRestException | TwilioServiceException) -> int | None:
    try:
        return int(exc.code) if exc.code is not None else None
    except (TypeError, ValueError):
        return None


def _message_of(exc: TwilioRestException | TwilioServiceException) -> str:
    if isinstance(exc, TwilioServiceException):
        return str(exc.detail or exc.title or "")
    return str(exc.msg or "")
