"""Reading what the gateway did, through its admin API and metrics, for any platform endpoint.

Waiting is on a condition with a timeout (``wait_until``), never a fixed sleep; the one
negative check (``assert_quiet``) waits a stated period for something that must not come.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.conftest import Gateway
from tests.fakeplatform import FakePlatform


async def contact(gateway: Gateway, contact_id: str) -> dict[str, Any] | None:
    """``GET /admin/contacts/<contact_id>``: the contact and its conversations, or None (404)."""
    response = await gateway.client.get(f"/admin/contacts/{contact_id}", headers=gateway.admin_headers())
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def conversations(gateway: Gateway, contact_id: str) -> list[dict[str, Any]]:
    """The contact's sessions, newest first (the contact must exist)."""
    found = await contact(gateway, contact_id)
    assert found is not None, f"no contact {contact_id}"
    return list(found["conversations"])


async def only_session(gateway: Gateway, contact_id: str) -> dict[str, Any]:
    [session] = await conversations(gateway, contact_id)
    return dict(session)


async def listed_sessions(gateway: Gateway, endpoint: str | None = None) -> list[dict[str, Any]]:
    path = "/admin/sessions" + (f"?endpoint={endpoint}" if endpoint else "")
    return list((await gateway.admin_get(path))["sessions"])


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``check`` until it holds (for state with no platform request to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def wait_closed(gateway: Gateway, contact_id: str, count: int = 1) -> dict[str, Any]:
    """The newest session of the contact once ``count`` of its sessions are closed with a final
    notice outcome (not "queued") and the newest is closed."""

    async def closed() -> bool:
        found = await contact(gateway, contact_id)
        if found is None or not found["conversations"]:
            return False
        sessions = found["conversations"]
        done = [s for s in sessions if s["state"] == "closed" and s["notice"] != "queued"]
        return len(done) >= count and sessions[0]["state"] == "closed" and sessions[0]["notice"] != "queued"

    await wait_until(closed)
    return (await conversations(gateway, contact_id))[0]


def rejected(gateway: Gateway, endpoint: str, status: int) -> float:
    """How many webhook requests the endpoint refused with ``status`` (by the adapter)."""
    return gateway.metrics.value("gateway_webhook_requests_total", endpoint=endpoint, outcome=f"rejected_{status}")


def inbound_rows(database: Path) -> int:
    """Rows of the SQLite store's inbound (dedup) table: a refused request leaves none."""
    with sqlite3.connect(database) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM inbound").fetchone()[0])


async def assert_nothing_stored(
    gateway: Gateway, endpoint: str, api: FakePlatform, database: Path, *contact_ids: str
) -> None:
    """After a refused request: no contact, no session, no event, no dedup row, no send."""
    await gateway.settle()
    for contact_id in contact_ids:
        assert await contact(gateway, contact_id) is None, contact_id
    assert await listed_sessions(gateway) == []
    assert gateway.metrics.total("gateway_events_total") == 0
    assert inbound_rows(database) == 0
    assert api.requests == []


async def assert_quiet(api: FakePlatform, within_s: float) -> None:
    """A negative check: no further request reaches the fake within ``within_s``."""
    count = len(api.requests)
    try:
        await api.wait_for(count + 1, timeout_s=within_s)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected request: {api.requests[count:]}")


def iso_seconds(text: str) -> float:
    """POSIX seconds of an admin API time (ISO 8601; a naive one is UTC)."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
