"""What every platform kit offers, so that a test can speak to any webhook platform the same way.

A kit is one platform's side of the wire, as the tests play it:

- ``endpoint(api_url, minutes=..., **on_close)``: the endpoint entry for ``write_config``;
  ``settings(directory, api, minutes=..., notify=..., **sections)``: settings with it alone;
- ``text(text, conversation=..., user=..., event_id=...)``: an ``Inbound`` webhook carrying one
  user text message, built as the platform builds it; ``redelivery(inbound)``: the same event
  as the platform sends it again (a new envelope, a retry header, ...);
- ``sign(body, url)``: the signature headers, made as the platform makes them (with the
  official SDK's signer where there is one); ``forge(case, inbound, url)``: a body and headers
  that must be refused (``forged_cases`` names them); ``malformed_bodies``;
- ``post(gateway, inbound)`` / ``say(gateway, inbound)``: the signed POST and its ``Ack``
  (``post_to`` for a ``GatewayProcess``);
- ``fake_api()``: the recording fake platform API (``tests.fakeplatform``) with the platform's
  success answers installed; ``server_error()``, ``rate_limited(s)``, ``slow(s)``: answers to
  make it fail on purpose (queue them with ``api.fail_next(kit.reply_path, ...)``);
- ``sent_texts(api, conversation)``: the texts the fake accepted for a conversation, in order;
  ``check_reply`` / ``check_notice``: one send request is addressed as the platform requires;
- ``session(gateway, conversation)``, ``wait_closed``, ``events``, ``rejected``,
  ``messages_out``, ``assert_nothing_stored``: what the gateway holds for the endpoint.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from gateway.settings import Settings
from tests.conftest import Gateway, make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits import observe

# The forged-signature cases every platform has; a kit adds its own in ``own_forged_cases``.
COMMON_FORGED_CASES = ("missing", "empty", "garbage", "other-secret", "other-body", "tampered")
# ``forge("tampered", ...)`` signs a body with this text and sends it with the text changed.
TAMPER_FROM, TAMPER_TO = "pay10", "pay99"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One webhook request as the platform sends it, before signing."""

    payload: Any  # the JSON value, or the form fields (Twilio)
    body: bytes
    conversation: str  # the gateway's conversation id for it
    headers: Mapping[str, str] = field(default_factory=dict)  # unsigned extras (Slack's retry headers)


@dataclass(frozen=True, slots=True)
class Ack:
    """The gateway's immediate answer to a webhook POST (compared without its headers)."""

    status: int
    content_type: str
    text: str
    headers: Mapping[str, str] = field(default_factory=dict, compare=False)


class Kit(ABC):
    """One platform, as the tests play it. Subclasses set the class attributes."""

    platform: ClassVar[str]  # the ``channel`` of the endpoint ("messenger")
    endpoint_name: ClassVar[str]  # the endpoint's name, also the contact id prefix ("fb")
    credentials: ClassVar[Mapping[str, str]]
    signature_header: ClassVar[str]
    reply_path: ClassVar[str]  # where the answer to a fresh user message goes
    notice_path: ClassVar[str | None] = None  # where a closure notice goes, if not ``reply_path``
    text_limit: ClassVar[int]  # the platform's limit on one message's text
    own_forged_cases: ClassVar[tuple[str, ...]] = ()
    malformed_bodies: ClassVar[Mapping[str, bytes]]  # id -> a body that cannot be the platform's
    # Defaults most platforms share:
    content_type: ClassVar[str] = "application/json"
    ack: ClassVar[Ack] = Ack(200, "text/plain", "")  # the answer to every accepted POST
    bare_get_status: ClassVar[int] = 400  # a GET without any handshake parameters
    conversations: ClassVar[tuple[str, str]] = ("U1", "U2")  # two distinct conversations
    rate_limit: ClassVar[Mapping[str, float] | None] = None  # lifts a default limit tests would wait on
    bye: ClassVar[str] = "bye"  # the closure notice ``endpoint`` configures

    def __repr__(self) -> str:
        return self.platform

    # -- the endpoint ----------------------------------------------------------------------------

    def endpoint(self, api_url: str, *, minutes: float = 0, **on_close: Any) -> dict[str, Any]:
        """The endpoint entry for ``write_config``: credentials, ``api_base_url``, the session
        with ``bye`` as its closure notice (``minutes=0`` never expires), ``on_close`` options
        (``notify=False``) and ``rate_limit``."""
        entry: dict[str, Any] = {
            "name": self.endpoint_name,
            "channel": self.platform,
            "api_base_url": api_url,
            "credentials": dict(self.credentials),
            "session": {"expiration_minutes": minutes, "on_close": {"messages": [self.bye], **on_close}},
        }
        if self.rate_limit is not None:
            entry["rate_limit"] = dict(self.rate_limit)
        return entry

    def settings(
        self, directory: Path, api: FakePlatform, *, minutes: float = 0, notify: bool = True, **sections: Any
    ) -> Settings:
        """Settings (a config file in ``directory``) with this endpoint alone, on ``api``;
        ``sections`` are other config sections (``server``, ``flow``)."""
        on_close = {} if notify else {"notify": False}
        return make_settings(directory, [self.endpoint(api.url, minutes=minutes, **on_close)], **sections)

    @property
    def webhook_path(self) -> str:
        return f"/webhooks/{self.endpoint_name}"

    def contact_id(self, conversation: str) -> str:
        return f"{self.endpoint_name}:{conversation}"

    # -- what the gateway holds for this endpoint (admin API, metrics) --------------------------

    async def contact(self, gateway: Gateway, conversation: str) -> dict[str, Any] | None:
        """The conversation's contact and its sessions, or None."""
        return await observe.contact(gateway, self.contact_id(conversation))

    async def sessions(self, gateway: Gateway, conversation: str) -> list[dict[str, Any]]:
        """The conversation's sessions, newest first (its contact must exist)."""
        return await observe.conversations(gateway, self.contact_id(conversation))

    async def session(self, gateway: Gateway, conversation: str) -> dict[str, Any]:
        """The conversation's only session."""
        return await observe.only_session(gateway, self.contact_id(conversation))

    async def wait_closed(self, gateway: Gateway, conversation: str, count: int = 1) -> dict[str, Any]:
        """The newest session once ``count`` sessions are closed with a final notice outcome."""
        return await observe.wait_closed(gateway, self.contact_id(conversation), count)

    def events(self, gateway: Gateway, outcome: str) -> float:
        """``gateway_events_total`` of this endpoint: accepted, duplicate, ignored, overloaded."""
        return gateway.metrics.value("gateway_events_total", endpoint=self.endpoint_name, outcome=outcome)

    def rejected(self, gateway: Gateway, status: int) -> float:
        """Webhook requests of this endpoint the adapter refused with ``status``."""
        return observe.rejected(gateway, self.endpoint_name, status)

    def messages_out(self, gateway: Gateway, outcome: str) -> float:
        """``gateway_messages_out_total`` of this endpoint: sent, retry, dead."""
        return gateway.metrics.value("gateway_messages_out_total", endpoint=self.endpoint_name, outcome=outcome)

    async def assert_nothing_stored(
        self, gateway: Gateway, api: FakePlatform, database: Path, *conversations: str
    ) -> None:
        """After a refused request: no contact (of ``conversations``), session, event, dedup
        row or send."""
        contact_ids = [self.contact_id(c) for c in conversations]
        await observe.assert_nothing_stored(gateway, self.endpoint_name, api, database, *contact_ids)

    # -- bodies ----------------------------------------------------------------------------------

    @abstractmethod
    def text(
        self, text: str, *, conversation: str | None = None, user: str | None = None, event_id: str | None = None
    ) -> Inbound:
        """A user's text message in ``conversation`` (default: the first of ``conversations``),
        from ``user`` where the platform tells users and conversations apart; ``event_id`` is
        the platform's id for deduplication (fresh when not given)."""

    @abstractmethod
    def redelivery(self, inbound: Inbound) -> Inbound:
        """``inbound`` as the platform delivers it again: the same event id, a new envelope."""

    # -- signing ---------------------------------------------------------------------------------

    @abstractmethod
    def sign(self, body: bytes, url: str, *, secret: str | None = None) -> dict[str, str]:
        """The headers that sign ``body`` sent to ``url`` (Twilio signs the URL too)."""

    @property
    def forged_cases(self) -> tuple[str, ...]:
        return COMMON_FORGED_CASES + self.own_forged_cases

    def forge(self, case: str, inbound: Inbound, url: str) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one refused request (``case`` from ``forged_cases``)."""
        body = inbound.body
        if case == "missing":
            return body, {}
        if case == "empty":
            return body, {**self.sign(body, url), self.signature_header: ""}
        if case == "garbage":
            return body, {**self.sign(body, url), self.signature_header: "not a signature!"}
        if case == "other-secret":
            return body, self.sign(body, url, secret="not-the-endpoint-secret")
        if case == "other-body":
            return body, self.sign(self.text("something else").body, url)
        if case == "tampered":
            tampered = body.replace(TAMPER_FROM.encode(), TAMPER_TO.encode())
            assert tampered != body, f"tampered needs {TAMPER_FROM!r} in the body"
            return tampered, self.sign(body, url)
        raise AssertionError(f"{self.platform}: no forged case {case!r}")

    # -- posting ---------------------------------------------------------------------------------

    def webhook_url(self, gateway: Gateway, path: str | None = None) -> str:
        """The URL the gateway sees the request at (what Twilio signs)."""
        return str(gateway.client.make_url(path or self.webhook_path))

    async def post(
        self,
        gateway: Gateway,
        request: Inbound | bytes,
        *,
        headers: Mapping[str, str] | None = None,
        signed_for: str | None = None,
        path: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Ack:
        """POST to the webhook, signed over ``signed_for`` (default: the URL it reaches), or
        with ``headers`` instead of a signature when given."""
        body = request.body if isinstance(request, Inbound) else request
        path = path or self.webhook_path
        if headers is None:
            headers = self.sign(body, signed_for or self.webhook_url(gateway, path))
        sent = {"Content-Type": self.content_type, **headers, **(extra_headers or {})}
        if isinstance(request, Inbound):
            sent.update(request.headers)
        response = await gateway.client.post(path, data=body, headers=sent)
        return Ack(response.status, response.content_type, await response.text(), dict(response.headers))

    async def post_to(
        self, http: aiohttp.ClientSession, base_url: str, request: Inbound, path: str | None = None
    ) -> int:
        """POST ``request`` signed to the gateway at ``base_url`` (a ``GatewayProcess``), at
        ``path`` (default: this endpoint's webhook); the status."""
        url = base_url + (path or self.webhook_path)
        headers = {"Content-Type": self.content_type, **self.sign(request.body, url), **request.headers}
        async with http.post(url, data=request.body, headers=headers) as response:
            await response.read()
            return response.status

    async def say(self, gateway: Gateway, request: Inbound) -> None:
        """POST ``request`` signed and assert it was accepted."""
        assert await self.post(gateway, request) == self.ack

    # -- the fake platform API --------------------------------------------------------------------

    @asynccontextmanager
    async def fake_api(self) -> AsyncIterator[FakePlatform]:
        """The recording fake API, answering every send as the platform does on success."""
        async with FakePlatform() as api:
            self.install(api)
            yield api

    @abstractmethod
    def install(self, api: FakePlatform) -> None:
        """Script the platform's success answers on ``api``."""

    @abstractmethod
    def sent(self) -> Answer:
        """The platform's answer to a successful send."""

    @abstractmethod
    def server_error(self) -> Answer:
        """A 5xx as the platform sends it."""

    @abstractmethod
    def rate_limited(self, retry_after_s: int) -> Answer:
        """A 429 with ``Retry-After`` as the platform sends it."""

    def slow(self, delay_s: float) -> Answer:
        """Success, after ``delay_s``."""
        answer = self.sent()
        return Answer(answer.status, answer.json_body, answer.text, answer.headers, delay_s)

    # -- reading what the fake received ------------------------------------------------------------

    @property
    def send_paths(self) -> tuple[str, ...]:
        return (self.reply_path,) if self.notice_path is None else (self.reply_path, self.notice_path)

    def sends(self, api: FakePlatform) -> list[RecordedRequest]:
        """Every send request the fake received (accepted or not), in order."""
        return [r for r in api.requests if r.path in self.send_paths]

    @abstractmethod
    def texts_of(self, request: RecordedRequest) -> list[tuple[str, str]]:
        """``(conversation, text)`` for every message of one send request."""

    def accepted(self, request: RecordedRequest) -> bool:
        """Did the fake accept this send (a 2xx, by default)?"""
        return request.answer is not None and 200 <= request.answer.status < 300

    def sent_texts(self, api: FakePlatform, conversation: str | None = None) -> list[str]:
        """The texts the fake accepted (for ``conversation`` if given), in arrival order."""
        return [
            text
            for request in self.sends(api)
            if self.accepted(request)
            for to, text in self.texts_of(request)
            if conversation is None or to == conversation
        ]

    @abstractmethod
    def check_reply(self, request: RecordedRequest, answering: Inbound, text: str) -> None:
        """Assert ``request`` answers the message ``answering`` with ``text`` in its conversation,
        addressed and authenticated as the platform requires."""

    @abstractmethod
    def check_notice(self, request: RecordedRequest, conversation: str, text: str) -> None:
        """Assert ``request`` is a bot-initiated message (a closure notice) of ``text`` to
        ``conversation``, addressed and authenticated as the platform requires."""


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
