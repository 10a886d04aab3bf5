"""Pure rules of the session lifecycle: what a close clears, which notice, how a flow's answer
changes a session. No I/O and no timing here (that is ``gateway.sessions``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from gateway.flows import FlowResult
from gateway.models import CloseReason, Contact, JSONDict, Session, SessionState
from gateway.policy import EndpointPolicy

NOTICE_QUEUED = "queued"
NOTICE_NONE = "none"


def close_session(session: Session, reason: CloseReason, at: float, policy: EndpointPolicy | None) -> None:
    """Mark ``session`` closed and clear what S19 says: variables without their own TTL and the
    dialog context; auth profiles too when ``clear_auth_profiles`` is set (S11) or on refresh
    (S17: everything is cleared). The session itself stays in the contact's history (S6)."""
    session.state = SessionState.CLOSED
    session.closed_at = at
    session.close_reason = reason
    session.variables = None
    session.context = None
    if reason is CloseReason.REFRESH or (policy is not None and policy.on_close.clear_auth_profiles):
        session.auth_profiles = None


def notice_decision(session: Session, reason: CloseReason, notify: bool, contact: Contact | None) -> str:
    """The notice outcome decided at close: ``queued`` when a closure notice must go out,
    else why not (``none`` for silent, S9; ``skipped: <reason>``)."""
    if reason is CloseReason.ENDPOINT_REMOVED:
        return "skipped: endpoint removed"
    if reason is CloseReason.REFRESH or not notify:
        return NOTICE_NONE
    if not session.interactive:
        return "skipped: never interactive"
    if contact is not None and contact.opted_out:
        return "skipped: opted out"
    return NOTICE_QUEUED


class ClosureTexts:
    """Picks the closure message per closure (S10): per-channel variants when configured,
    otherwise the endpoint's list, taken in turn so every variant is used."""

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], Iterator[str]] = {}

    def pick(self, policy: EndpointPolicy) -> str | None:
        texts = policy.on_close.messages_by_channel.get(policy.channel) or policy.on_close.messages
        if not texts:
            return None
        key = (policy.endpoint, "\x00".join(texts))
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = itertools.cycle(texts)
        return next(turn)


def clear_ttl_variables(contact: Contact) -> None:
    """Refresh clears everything, variables with their own TTL too (S17)."""
    contact.variables = {}


def live_ttl_variables(contact: Contact | None, now: float) -> JSONDict:
    """The contact's variables whose TTL has not run out (S19)."""
    if contact is None:
        return {}
    return {name: entry for name, entry in contact.variables.items() if entry.get("expires_at", 0) > now}


def apply_flow_result(session: Session, contact: Contact, result: FlowResult, now: float) -> None:
    """Merge the flow's answer into the session (DESIGN.md "Flows"): variables (a value with
    ``ttl_seconds`` lives on the contact until it expires, S19; null deletes), context,
    auth profiles (null deletes one), intent."""
    if result.intent is not None:
        session.intent = result.intent
    if result.context is not None:
        session.context = result.context
    if result.variables:
        variables = dict(session.variables or {})
        for name, value in result.variables.items():
            contact.variables.pop(name, None)
            variables.pop(name, None)
            if value is None:
                continue
            ttl = _ttl_of(value)
            if ttl is not None:
                contact.variables[name] = {"value": value["value"], "expires_at": now + ttl}
            else:
                variables[name] = value
        session.variables = variables or None
    if result.auth_profiles:
        profiles = dict(session.auth_profiles or {})
        for name, tokens in result.auth_profiles.items():
            if tokens is None:
                profiles.pop(name, None)
            else:
                profiles[name] = tokens
        session.auth_profiles = profiles or None


def _ttl_of(value: Any) -> float | None:
    if isinstance(value, dict) and set(value) == {"value", "ttl_seconds"}:
        ttl = value["ttl_seconds"]
        if isinstance(ttl, int | float) and ttl > 0:
            return float(ttl)
    return None
