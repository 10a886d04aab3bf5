"""Crash and restart of a real ``chat-gateway serve`` process (kill -9): overdue sessions close
once with one notice, the others at their original deadline, and an event acknowledged but not
yet answered is answered after the restart. A second process on the same database refuses."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakeplatform import FakePlatform
from tests.gateway_process import FlowServer, GatewayProcess, run_cli
from tests.kits.messenger import MESSENGER, SEND_PATH


def messenger_endpoint(name: str, minutes: float, api: str) -> dict[str, Any]:
    """A Messenger endpoint named ``name``, closing with "closed <name>"."""
    return {**MESSENGER.endpoint(api, minutes=minutes, messages=[f"closed {name}"]), "name": name}


async def post_messenger(http: aiohttp.ClientSession, gateway: GatewayProcess, name: str, psid: str, text: str) -> int:
    inbound = MESSENGER.text(text, user=psid)
    return await MESSENGER.post_to(http, gateway.url, inbound, path=f"/webhooks/{name}")


@pytest.fixture
async def flow_server() -> AsyncIterator[FlowServer]:
    async with FlowServer() as flow:
        yield flow


def _sessions(db: Path) -> dict[str, list[sqlite3.Row]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM sessions ORDER BY started_at").fetchall()
    by_conversation: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        by_conversation.setdefault(row["conversation"], []).append(row)
    return by_conversation


def _sent_to(api: FakePlatform, psid: str) -> list[str]:
    return MESSENGER.sent_texts(api, psid)


async def test_kill_9_and_restart(tmp_path: Path, flow_server: FlowServer) -> None:
    async with MESSENGER.fake_api() as api:
        gateway = GatewayProcess.configured(
            tmp_path,
            [messenger_endpoint("short", 0.02, api.url), messenger_endpoint("long", 0.15, api.url)],
            flow=flow_server.config(),
        )
        try:
            gateway.start()
            await gateway.wait_healthy()
            async with aiohttp.ClientSession() as http:
                assert await post_messenger(http, gateway, "short", "U-overdue", "hi") == 200
                assert await post_messenger(http, gateway, "long", "U-long", "hi") == 200
                await api.wait_for(2, SEND_PATH)
                # Acknowledged (200) but held in the flow when the process dies:
                assert await post_messenger(http, gateway, "long", "U-held", "hold me") == 200
                await asyncio.wait_for(flow_server.held.wait(), 10)
            gateway.kill()
            db = tmp_path / "gateway.db"
            long_deadline = _sessions(db)["U-long"][0]["expires_at"]
            # While it is down, U-overdue's 1.2 s deadline passes.
            await asyncio.sleep(1.5)
            flow_server.release.set()
            gateway.start()
            await gateway.wait_healthy()
            # The held event is re-run after the restart and answered.
            await api.wait_for(1, SEND_PATH, timeout_s=10)
            deadline = time.time() + 15
            while time.time() < deadline and not (
                "echo hold me" in _sent_to(api, "U-held") and "closed short" in _sent_to(api, "U-overdue")
            ):
                await asyncio.sleep(0.05)
            assert _sent_to(api, "U-held") == ["echo hold me"]
            assert _sent_to(api, "U-overdue") == ["echo hi", "closed short"]
            # U-long closes at its original deadline (9 s after its message), not restarted.
            while time.time() < long_deadline + 3 and "closed long" not in _sent_to(api, "U-long"):
                await asyncio.sleep(0.05)
            assert _sent_to(api, "U-long") == ["echo hi", "closed long"]
            sessions = _sessions(db)
            [overdue] = sessions["U-overdue"]
            assert (
                overdue["state"] == "closed" and overdue["close_reason"] == "inactivity" and overdue["notice"] == "sent"
            )
            [long] = sessions["U-long"]
            assert long["expires_at"] == pytest.approx(long_deadline)
            assert 0 <= long["closed_at"] - long_deadline < 0.1
            # A little later, still exactly one notice each: nothing fired twice.
            await asyncio.sleep(0.3)
            assert _sent_to(api, "U-overdue").count("closed short") == 1
        finally:
            gateway.stop()


WEBCHAT = [{"name": "web", "channel": "webchat"}]


async def test_second_process_on_same_database_refuses(tmp_path: Path) -> None:
    first = GatewayProcess.configured(tmp_path, WEBCHAT)
    try:
        first.start()
        await first.wait_healthy()
        second = GatewayProcess.configured(tmp_path / "second", WEBCHAT, storage={"path": str(tmp_path / "gateway.db")})
        result = run_cli(second.config.parent, "serve", "--config", str(second.config))
        assert result.returncode == 1
        assert "in use by another gateway process" in result.stderr
    finally:
        first.stop()


async def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    gateway = GatewayProcess.configured(tmp_path, WEBCHAT)
    gateway.start()
    await gateway.wait_healthy()
    assert gateway.terminate() == 0
