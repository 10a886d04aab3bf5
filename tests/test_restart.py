"""Crash and restart of a real ``chat-gateway serve`` process (kill -9): overdue sessions close
once with one notice, the others at their original deadline, and an event acknowledged but not
yet answered is answered after the restart. A second process on the same database refuses."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import write_config
from tests.fakeplatform import Answer, FakePlatform
from tests.gateway_process import GatewayProcess, free_port

APP_SECRET = "fb-app-secret"
SEND_PATH = "/v21.0/me/messages"


def messenger_endpoint(name: str, minutes: float, api: str) -> dict[str, Any]:
    return {
        "name": name,
        "channel": "messenger",
        "api_base_url": api,
        "credentials": {"app_secret": APP_SECRET, "verify_token": "v", "page_access_token": "page-token"},
        "session": {"expiration_minutes": minutes, "on_close": {"messages": [f"closed {name}"]}},
    }


def messenger_body(psid: str, text: str, mid: str) -> bytes:
    now_ms = int(time.time() * 1000)
    item = {
        "sender": {"id": psid},
        "recipient": {"id": "PAGE"},
        "timestamp": now_ms,
        "message": {"mid": mid, "text": text},
    }
    return json.dumps({"object": "page", "entry": [{"id": "PAGE", "time": now_ms, "messaging": [item]}]}).encode()


async def post_messenger(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": signature, "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as response:
        return response.status


class HoldingFlow:
    """An http flow server: echoes, but holds any text starting with "hold" until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        app = web.Application()
        app.router.add_post("/flow", self._flow)
        self.server = TestServer(app, host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/flow"))

    async def _flow(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["event"]["text"]
        if text.startswith("hold") and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        return web.json_response({"replies": [{"text": f"echo {text}"}]})


@pytest.fixture
async def flow_server() -> AsyncIterator[HoldingFlow]:
    flow = HoldingFlow()
    await flow.server.start_server()
    yield flow
    flow.release.set()
    await flow.server.close()


def _sessions(db: Path) -> dict[str, list[sqlite3.Row]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM sessions ORDER BY started_at").fetchall()
    by_conversation: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        by_conversation.setdefault(row["conversation"], []).append(row)
    return by_conversation


def _sent_to(api: FakePlatform, psid: str) -> list[str]:
    return [r.json()["message"]["text"] for r in api.to(SEND_PATH) if r.json()["recipient"]["id"] == psid]


async def test_kill_9_and_restart(tmp_path: Path, flow_server: HoldingFlow) -> None:
    async with FakePlatform() as api:
        api.respond(SEND_PATH, Answer(json_body={"recipient_id": "U", "message_id": "m"}))
        port = free_port()
        config = write_config(
            tmp_path,
            [messenger_endpoint("short", 0.02, api.url), messenger_endpoint("long", 0.15, api.url)],
            server={"host": "127.0.0.1", "port": port},
            flow={"type": "http", "url": flow_server.url, "timeout_seconds": 30},
        )
        gateway = GatewayProcess(config, port)
        try:
            gateway.start()
            await gateway.wait_healthy()
            async with aiohttp.ClientSession() as http:
                assert (
                    await post_messenger(http, f"{gateway.url}/webhooks/short", messenger_body("U-overdue", "hi", "m1"))
                    == 200
                )
                assert (
                    await post_messenger(http, f"{gateway.url}/webhooks/long", messenger_body("U-long", "hi", "m2"))
                    == 200
                )
                await api.wait_for(2, SEND_PATH)
                # Acknowledged (200) but held in the flow when the process dies:
                assert (
                    await post_messenger(
                        http, f"{gateway.url}/webhooks/long", messenger_body("U-held", "hold me", "m3")
                    )
                    == 200
                )
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


async def test_second_process_on_same_database_refuses(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, [{"name": "web", "channel": "webchat"}], server={"host": "127.0.0.1", "port": port})
    first = GatewayProcess(config, port)
    try:
        first.start()
        await first.wait_healthy()
        other_port = free_port()
        second_config = tmp_path / "second.yaml"
        second_config.write_text(config.read_text().replace(f"port: {port}", f"port: {other_port}"))
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--config", str(second_config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "in use by another gateway process" in result.stderr
    finally:
        first.stop()


async def test_sigterm_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, [{"name": "web", "channel": "webchat"}], server={"host": "127.0.0.1", "port": port})
    gateway = GatewayProcess(config, port)
    gateway.start()
    await gateway.wait_healthy()
    assert gateway.terminate() == 0
