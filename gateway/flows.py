"""Flows: the bot logic a session hands its events to. ``echo`` and ``http`` (DESIGN.md "Flows").

A flow raises ``FlowError`` for anything that went wrong (timeout, non-2xx, a body that is not
the contract's shape); the session manager logs, counts and carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from gateway.errors import FlowError
from gateway.models import EventKind, InboundEvent, JSONDict, Session
from gateway.settings import FlowSettings, FlowType
from gateway.wire import flow_session_json, iso


@dataclass(slots=True, frozen=True)
class FlowTurn:
    """One event handed to the flow, with the session it belongs to."""

    session: Session
    event: InboundEvent
    contact_variables: JSONDict = field(default_factory=dict)
    auth_profiles: JSONDict = field(default_factory=dict)
    after_expiry: bool = False  # first message after the deadline in lazy mode (S8)


@dataclass(slots=True)
class FlowResult:
    """What the flow answered. ``None`` fields were not given (nothing to change)."""

    replies: list[str] = field(default_factory=list)
    intent: str | None = None
    variables: JSONDict | None = None
    context: JSONDict | None = None
    auth_profiles: JSONDict | None = None
    end_session: bool = False


class Flow(Protocol):
    """The bot behind the gateway."""

    async def start(self, http: aiohttp.ClientSession) -> None: ...

    async def aclose(self) -> None: ...

    async def handle(self, turn: FlowTurn) -> FlowResult:
        """Answer one user event. Raises ``FlowError`` on any failure."""
        ...


class EchoFlow:
    """Replies to every user text message with the same text; non-text gets no answer."""

    async def start(self, http: aiohttp.ClientSession) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def handle(self, turn: FlowTurn) -> FlowResult:
        event = turn.event
        if event.kind is EventKind.MESSAGE and event.text:
            return FlowResult(replies=[event.text])
        return FlowResult()


class HttpFlow:
    """POSTs ``{"session", "event"}`` to ``url`` and reads ``{"replies", ...}`` back."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def aclose(self) -> None:
        self._http = None

    async def handle(self, turn: FlowTurn) -> FlowResult:
        if self._http is None:
            raise FlowError("http flow used before start()")
        try:
            body = {
                "session": flow_session_json(turn.session, turn.contact_variables, turn.auth_profiles),
                "event": event_json(turn),
            }
            async with self._http.post(self._url, json=body, timeout=self._timeout) as response:
                if response.status >= 300:
                    raise FlowError(f"flow answered HTTP {response.status}")
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise FlowError(f"flow call failed: {exc.__class__.__name__}: {exc}") from exc
        return parse_flow_answer(answer)


def event_json(turn: FlowTurn) -> JSONDict:
    """The ``event`` object of the http flow contract."""
    event = turn.event
    return {
        "type": "message",
        "text": event.text,
        "attachments": list(event.attachments),
        "message_id": event.message_id,
        "timestamp": iso(event.timestamp),
        "after_expiry": turn.after_expiry,
        "postback": event.kind is EventKind.POSTBACK,
    }


def parse_flow_answer(answer: Any) -> FlowResult:
    """Check the flow's answer against the contract; ``FlowError`` names what is wrong."""
    if not isinstance(answer, dict):
        raise FlowError("flow answer is not a JSON object")
    replies = answer.get("replies", [])
    if not isinstance(replies, list) or not all(
        isinstance(r, dict) and isinstance(r.get("text"), str) for r in replies
    ):
        raise FlowError('flow answer "replies" must be a list of {"text": string}')
    result = FlowResult(replies=[r["text"] for r in replies], end_session=bool(answer.get("end_session", False)))
    intent = answer.get("intent")
    if intent is not None and not isinstance(intent, str):
        raise FlowError('flow answer "intent" must be a string')
    result.intent = intent
    for name in ("variables", "context", "auth_profiles"):
        value = answer.get(name)
        if value is not None and not isinstance(value, dict):
            raise FlowError(f'flow answer "{name}" must be an object')
        setattr(result, name, value)
    return result


def create_flow(settings: FlowSettings) -> Flow:
    """The flow the configuration asks for."""
    if settings.type is FlowType.HTTP and settings.url:
        return HttpFlow(settings.url, settings.timeout_seconds)
    return EchoFlow()
