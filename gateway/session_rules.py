"""Pure rules of the session lifecycle: what a close clears, which notice, how a flow's answer
changes a session. No I/O and no timing here (that is the ``gateway.sessions`` package).
"""

from __future__ import annotations

import itertools
import string
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
    otherwise the endpoint's list, taken in turn so every variant is used. Placeholders:
    ``{expiration_minutes}`` and ``{name}`` (the contact's name when the platform gave one,
    else "there"); any other ``{...}`` is left as written."""

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], Iterator[str]] = {}

    def pick(self, policy: EndpointPolicy, contact: Contact | None = None) -> str | None:
        texts = policy.on_close.messages_by_channel.get(policy.channel) or policy.on_close.messages
        if not texts:
            return None
        key = (policy.endpoint, "\x00".join(texts))
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = itertools.cycle(texts)
        name = contact.display_name if contact is not None and contact.display_name else "there"
        return _render(next(turn), _Placeholders(expiration_minutes=f"{policy.expiration_minutes:g}", name=name))


class _Placeholders(dict[str, str]):
    """Known placeholders; an unknown one renders as itself."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _render(text: str, values: _Placeholders) -> str:
    """``text`` with its ``{name}`` placeholders filled; text that is not a simple template (a
    lone brace, ``{0}``, ``{a.b}``) is sent as written."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text)]
    except ValueError:
        return text
    if not all(name is None or name.isidentifier() for name in fields):
        return text
    return text.format_map(values)


def discard_command(text: str | None, policy: EndpointPolicy) -> str | None:
    """ "discard" or "discard all" when the user's text is one of the endpoint's discard words
    (S18; case and surrounding blanks do not matter), else None."""
    if not text:
        return None
    said = " ".join(text.split()).casefold()
    if said in policy.discard_all_words:
        return "discard all"
    if said in policy.discard_words:
        return "discard"
    return None


def apply_discard(session: Session, command: str) -> None:
    """S18 on the flow's dialog context (``context.tags.current``, ``context.tags.historic``,
    ``context.sentiment``). ``discard all`` clears the dialog context and both tag lists and
    resets sentiment. ``discard`` clears the current dialog context and replaces the current
    tags with the last historic ones (``tags.historic`` is a list of earlier tag sets, newest
    last; a flat list of tags counts as one set), then clears the historic tags; sentiment stays.
    """
    context = session.context or {}
    if command == "discard all":
        session.context = {"tags": {"current": [], "historic": []}}
        return
    raw_tags = context.get("tags")
    tags: JSONDict = raw_tags if isinstance(raw_tags, dict) else {}
    raw_historic = tags.get("historic")
    historic: list[Any] = raw_historic if isinstance(raw_historic, list) else []
    if historic and all(isinstance(item, list) for item in historic):
        current = list(historic[-1])
    else:
        current = list(historic)
    kept: JSONDict = {"tags": {"current": current, "historic": []}}
    if "sentiment" in context:
        kept["sentiment"] = context["sentiment"]
    session.context = kept


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
