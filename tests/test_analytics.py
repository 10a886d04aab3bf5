"""``GET /admin/analytics/sessions``: sessions started in ``[since, until)`` counted by endpoint
and kind (S13 interactive / non-interactive, S14 developer, S15 billable) and by close reason."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gateway.wire import iso, parse_iso
from tests.conftest import Gateway, make_settings, webchat_endpoint

PATH = "/admin/analytics/sessions"
NO_CLOSES = {"inactivity": 0, "refresh": 0, "admin": 0, "flow": 0, "endpoint_removed": 0}


def _counts(sessions: int, interactive: int, developer: int, billable: int, **closed: int) -> dict[str, Any]:
    return {
        "sessions": sessions,
        "interactive": interactive,
        "non_interactive": sessions - interactive,
        "developer": developer,
        "billable": billable,
        "closed_by_reason": {**NO_CLOSES, **closed},
    }


async def _bot_message(gateway: Gateway, endpoint: str, conversation: str) -> dict[str, Any]:
    return await gateway.bot_message(endpoint, conversation, "news")


async def _user_session(gateway: Any, open_chat: Any, endpoint: str, conversation: str) -> Any:
    chat = await open_chat(gateway, conversation, endpoint=endpoint)
    await chat.say("hi")
    await chat.wait_for(lambda frames: any(f["type"] == "session" and f["state"] == "open" for f in frames))
    return chat


async def test_s13_s14_s15_counts_by_kind_and_close_reason(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """Interactive, non-interactive (bot-initiated), bot-initiated turned interactive,
    developer (interactive or not), billable = interactive and not developer; every configured
    endpoint is listed, with zeros when it had no sessions."""
    endpoints = [
        webchat_endpoint("web", minutes=0),
        {**webchat_endpoint("dev", minutes=0), "developer": True},
        webchat_endpoint("short", minutes=0.005),
        webchat_endpoint("idle", minutes=0),
    ]
    gateway = await start_gateway(make_settings(tmp_path, endpoints))
    # web: a (user, then closed by admin), b (bot only), c (bot, then user), e (user, then refresh)
    first = await _user_session(gateway, open_chat, "web", "a")
    await _bot_message(gateway, "web", "b")
    visitor = await open_chat(gateway, "c")  # the bot writes to a conversation the server issued
    await _bot_message(gateway, "web", visitor.conversation)
    await _user_session(gateway, open_chat, "web", "c")  # the same conversation, resumed
    refreshed = await _user_session(gateway, open_chat, "web", "e")
    await refreshed.refresh()
    await refreshed.wait_for(lambda frames: any(f["type"] == "session" and f["state"] == "closed" for f in frames))
    [a] = (await gateway.admin_get(f"/admin/contacts/web:{first.conversation}"))["conversations"]
    closed = await gateway.client.post(
        f"/admin/sessions/{a['id']}/close", json={"notify": False}, headers=gateway.admin_headers()
    )
    assert closed.status == 200
    # dev: one user session, one bot-only session (both developer, neither billable)
    await _user_session(gateway, open_chat, "dev", "d1")
    await _bot_message(gateway, "dev", "d2")
    # short: one user session closed on inactivity
    short = await _user_session(gateway, open_chat, "short", "s")
    await short.wait_messages(1, "closure")
    await gateway.settle()

    body = await gateway.admin_get(PATH)
    assert body == {
        "since": None,
        "until": None,
        "endpoints": {
            "web": _counts(4, interactive=3, developer=0, billable=3, admin=1, refresh=1),
            "dev": _counts(2, interactive=1, developer=2, billable=0),
            "short": _counts(1, interactive=1, developer=0, billable=1, inactivity=1),
            "idle": _counts(0, interactive=0, developer=0, billable=0),
        },
    }


async def test_since_until_filter_on_start_time(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """Sessions are counted where they STARTED: since inclusive, until exclusive; offsets and
    Z both work; an endpoint no longer configured still shows its sessions."""
    first = await start_gateway(make_settings(tmp_path, [webchat_endpoint("web", 0), webchat_endpoint("old", 0)]))
    await _bot_message(first, "old", "x")
    await _bot_message(first, "web", "early1")
    await _bot_message(first, "web", "early2")
    await asyncio.sleep(0.02)  # a gap between the two batches, so that ms-precise bounds split them
    late = await _bot_message(first, "web", "late1")
    await _user_session(first, open_chat, "web", "late2")
    await first.settle()
    await first.client.close()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint("web", 0)]))  # "old" removed

    boundary = late["started_at"]  # ms precision, at or just before late1's start
    everything = await gateway.admin_get(PATH)
    assert everything["endpoints"]["web"]["sessions"] == 4
    assert everything["endpoints"]["old"] == _counts(1, 0, 0, 0, endpoint_removed=1)

    early = await gateway.admin_get(f"{PATH}?until={boundary}")
    assert early["until"] == boundary and early["since"] is None
    assert early["endpoints"]["web"] == _counts(2, interactive=0, developer=0, billable=0)

    later = await gateway.admin_get(f"{PATH}?since={boundary}")
    assert later["endpoints"]["web"] == _counts(2, interactive=1, developer=0, billable=1)
    assert "old" not in later["endpoints"]  # not configured, no sessions in this range

    # The same instant written with an offset: encoded as %2B, or a raw "+" (read as a space).
    moment = datetime.fromtimestamp(parse_iso(boundary), UTC).astimezone(timezone(timedelta(hours=2)))
    with_offset = moment.isoformat(timespec="milliseconds")
    assert with_offset.endswith("+02:00")
    for since in (quote(with_offset), with_offset):
        same = await gateway.admin_get(f"{PATH}?since={since}")
        assert same["since"] == boundary and same["endpoints"] == later["endpoints"]

    empty = await gateway.admin_get(f"{PATH}?since={boundary}&until={boundary}")
    assert all(counts["sessions"] == 0 for counts in empty["endpoints"].values())
    future = iso(parse_iso(boundary) + 3600)
    assert (await gateway.admin_get(f"{PATH}?since={future}"))["endpoints"]["web"]["sessions"] == 0


async def test_bad_time_parameters_are_400(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint("web", 0)]))
    for query in (
        "since=yesterday",
        "until=2025-13-01T00:00:00Z",
        "since=2025-01-02T00:00:00Z&until=2025-01-01T00:00:00Z",
        "since=12345",
    ):
        response = await gateway.client.get(f"{PATH}?{query}", headers=gateway.admin_headers())
        assert response.status == 400, query
        assert "error" in await response.json()
    ok = await gateway.admin_get(f"{PATH}?since=2025-01-01&until=2025-01-02T00:00:00%2B00:00")
    assert ok["since"] == "2025-01-01T00:00:00.000Z" and ok["until"] == "2025-01-02T00:00:00.000Z"
    assert ok["endpoints"] == {"web": _counts(0, 0, 0, 0)}
    assert (await gateway.client.get(PATH)).status == 401
