"""Overload: the real app with ``server.max_pending_events: 5`` and a flow held on its gate.
A burst of signed LINE webhooks beyond the bound gets 503 with Retry-After for the excess and
nothing is stored for those; once the flow is released the gateway recovers: new webhooks get
200, every accepted event is answered once, and the rejected ones, re-sent as the platform
would, are answered once too."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_settings
from tests.fakeplatform import FakePlatform
from tests.kits.line import LINE, LineApi, line_api_with_once_rules
from tests.scripted_flow import ScriptedFlow

BOUND = 5
BURST = 12


@pytest.fixture
async def line() -> AsyncIterator[tuple[FakePlatform, LineApi]]:
    async with line_api_with_once_rules() as pair:
        yield pair


async def post(gateway: Gateway, user: str, text: str, event_id: str, attempt: int = 0) -> tuple[int, dict[str, str]]:
    inbound = LINE.text(text, conversation=user, event_id=event_id)
    for _ in range(attempt):
        inbound = LINE.redelivery(inbound)
    ack = await LINE.post(gateway, inbound)
    return ack.status, dict(ack.headers)


def inbound_keys(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        return {row[0] for row in conn.execute("SELECT dedup_key FROM inbound")}


@pytest.mark.parametrize("burst", ["sequential", "concurrent"])
async def test_burst_beyond_the_bound_gets_503_and_the_gateway_recovers(
    tmp_path: Path, line: tuple[FakePlatform, LineApi], start_gateway: Any, burst: str
) -> None:
    # (``line`` before ``start_gateway``: the gateway stops first, the fake API after it.)
    fake, api = line
    flow = ScriptedFlow()
    flow.gate = asyncio.Event()  # every turn waits here: accepted events pile up unhandled
    settings = make_settings(tmp_path, [LINE.endpoint(fake.url, minutes=30)], server={"max_pending_events": BOUND})
    gateway = await start_gateway(settings, flow=flow)

    try:
        # One user per event, so that no per-conversation order holds any of them back.
        sent = [(f"U{n:02d}", f"burst {n}", f"EV-BURST-{n:02d}") for n in range(BURST)]
        if burst == "sequential":
            answers = [await post(gateway, *item) for item in sent]
        else:
            answers = list(await asyncio.gather(*(post(gateway, *item) for item in sent)))
        statuses = [status for status, _headers in answers]
        accepted = [item for item, (status, _h) in zip(sent, answers, strict=True) if status == 200]
        rejected = [item for item, (status, _h) in zip(sent, answers, strict=True) if status == 503]
        assert Counter(statuses) == {200: BOUND, 503: BURST - BOUND}, (
            f"{burst} burst of {BURST} with max_pending_events={BOUND}: statuses {statuses}, "
            f"{gateway.manager.pending_events} events now pending"
        )
        if burst == "sequential":
            assert statuses == [200] * BOUND + [503] * (BURST - BOUND)  # the earlier ones got in
        for status, headers in answers:
            if status == 503:
                assert int(headers["Retry-After"]) > 0
        # Nothing is stored for the rejected ones; the accepted ones are in the inbox.
        assert inbound_keys(tmp_path) == {event_id for _u, _t, event_id in accepted}
        assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="overloaded") == BURST - BOUND
        assert gateway.manager.pending_events == BOUND  # held in the flow or queued behind it
        assert api.deliveries == []

        # Released: the backlog drains, and the gateway takes webhooks again.
        flow.gate.set()
        await gateway.settle()
        status, _headers = await post(gateway, "U-after", "after", "EV-AFTER")
        assert status == 200
        # The platform re-sends what got 503 (same webhookEventId) and, for good measure, what got 200.
        for user, text, event_id in [*rejected, *accepted]:
            status, _headers = await post(gateway, user, text, event_id, attempt=1)
            assert status == 200, (user, text)
        await gateway.settle()
        await asyncio.sleep(0.1)
        await gateway.settle()

        delivered = Counter((d.to, d.text) for d in api.deliveries)
        expected = Counter({(user, text): 1 for user, text, _e in [*sent, ("U-after", "after", "EV-AFTER")]})
        assert delivered == expected, api.deliveries
        assert inbound_keys(tmp_path) == {event_id for _u, _t, event_id in sent} | {"EV-AFTER"}
        assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="duplicate") == len(accepted)
    finally:
        flow.gate.set()  # never leave turns waiting at teardown
