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


def close_session(session: Session, reason: CloseReason, at: float) -> None:
    """Mark ``session`` closed and clear what S19 says: variables without their own TTL and the
    dialog context. The session itself stays in the contact's history (S6)."""
    session.state = SessionState.CLOSED
    session.closed_at = at
    session.close_reason = reason
    session.variables = None
    session.context = None


def clears_auth_profiles(reason: CloseReason, policy: EndpointPolicy | None) -> bool:
    """Auth profiles go at close when configured (S11), and always on refresh (S17)."""
    return reason is CloseReason.REFRESH or (policy is not None and policy.on_close.clear_auth_profiles)


def clear_auth_profiles(contact: Contact, names: list[str] | None = None) -> list[str]:
    """Remove the named auth profiles (all when ``names`` is None) and the TTL variables bound
    to them (S11: the user must authorise again). Returns the profiles removed."""
    removed = [name for name in contact.auth_profiles if names is None or name in names]
    for name in removed:
        del contact.auth_profiles[name]
    bound = [var for var, entry in contact.variables.items() if entry.get("auth_profile") in removed]
    for var in bound:
        del contact.variables[var]
    return removed


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
    return {
        name: entry
        for name, entry in contact.variables.items()
        if entry.get("expires_at") is None or entry["expires_at"] > now
    }


def apply_flow_result(session: Session, contact: Contact, result: FlowResult, now: float) -> None:
    """Merge the flow's answer into the session (DESIGN.md "Flows"): variables (a value with
    ``ttl_seconds`` lives on the contact until it expires, S19; one with ``auth_profile`` is bound
    to that profile and cleared with it, S11; null deletes), context, auth profiles (kept on the
    contact; null deletes one), intent."""
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
            ttl, profile = _ttl_of(value), _profile_of(value)
            if ttl is not None or profile is not None:
                # Kept on the contact: it outlives the session (TTL) or lives as long as its
                # auth profile. Without a TTL, "expires_at" is None: until cleared.
                contact.variables[name] = {
                    "value": value["value"],
                    "expires_at": now + ttl if ttl is not None else None,
                    "auth_profile": profile,
                }
            else:
                variables[name] = value
        session.variables = variables or None
    if result.auth_profiles:
        for name, tokens in result.auth_profiles.items():
            if tokens is None:
                clear_auth_profiles(contact, [name])
            else:
                contact.auth_profiles[name] = tokens


def _ttl_of(value: Any) -> float | None:
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "ttl_seconds", "auth_profile"}:
        ttl = value.get("ttl_seconds")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            return float(ttl)
    return None


def _profile_of(value: Any) -> str | None:
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "ttl_seconds", "auth_profile"}:
        profile = value.get("auth_profile")
        if isinstance(profile, str) and profile:
            return profile
    return None
