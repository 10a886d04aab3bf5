"""JSON shapes on the wire: one explicit function per type (DESIGN.md "HTTP surface")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.models import Contact, JSONDict, Session


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC (``...Z``) of a POSIX timestamp, None for None."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):  # NaN or beyond datetime's range
        return None


def parse_iso(text: str) -> float:
    """POSIX seconds of an ISO 8601 time; naive times are taken as UTC. Raises ValueError."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def session_json(session: Session) -> JSONDict:
    """The session as the admin API and the http flow see it."""
    return {
        "id": session.id,
        "endpoint": session.endpoint,
        "channel": session.channel,
        "conversation": session.conversation,
        "contact_id": session.contact_id,
        "state": session.state.value,
        "interactive": session.interactive,
        "developer": session.developer,
        "billable": session.billable,
        "started_at": iso(session.started_at),
        "last_activity_at": iso(session.last_activity_at),
        "expires_at": iso(session.expires_at),
        "closed_at": iso(session.closed_at),
        "close_reason": session.close_reason.value if session.close_reason else None,
        "notice": session.notice,
        "message_count": session.message_count,
        "intent": session.intent,
    }


def contact_json(contact: Contact) -> JSONDict:
    """The contact profile (without its conversations)."""
    return {
        "id": contact.id,
        "endpoint": contact.endpoint,
        "conversation": contact.conversation,
        "display_name": contact.display_name,
        "opted_out": contact.opted_out,
        "created_at": iso(contact.created_at),
        "last_user_message_at": iso(contact.last_user_message_at),
    }


def flow_session_json(session: Session, contact_variables: dict[str, Any], auth_profiles: JSONDict) -> JSONDict:
    """The session as the http flow receives it: JSON plus variables, context, auth profiles.

    Variables with their own TTL live on the contact (S19) and are merged under the session's;
    auth profiles live on the contact too (S11).
    """
    variables = {name: entry["value"] for name, entry in contact_variables.items()}
    variables.update(session.variables or {})
    return {
        **session_json(session),
        "variables": variables,
        "context": session.context or {},
        "auth_profiles": auth_profiles,
    }
