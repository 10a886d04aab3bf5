"""kill -9 between the parts of a split message, on a real ``chat-gateway serve`` process.

A user's long message is echoed back (the echo flow), which the gateway sends in three parts.
The fake platform API accepts part 1 and holds part 2 unanswered: the gateway commits a part's
progress before it sends the next, so part 2 arriving at the fake means part 1 is on record.
The gateway is SIGKILLed there and restarted; the fake must have accepted each part exactly
once in total: part 1 is not sent again, part 2 (cut off, never accepted) is sent once more,
then part 3. In-memory progress (what the adapters kept before) would send part 1 twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import write_config
from tests.gateway_process import GatewayProcess, free_port
from tests.kits import MESSENGER, SLACK, Kit


@dataclass(frozen=True, slots=True)
class Platform:
    """A platform's send path, how to read the text of a send and answer it, its endpoint
    config and a signed webhook carrying the user's text, and a text of three parts."""

    send_path: str
    text_of: Callable[[Any], str]
    accepted: Callable[[Any], dict[str, Any]]
    kit: Kit  # the endpoint's config and the signed webhook carrying the user's text
    text: str


PLATFORMS = {
    "slack": Platform(
        "/api/chat.postMessage",
        lambda body: str(body["text"]),
        lambda body: {"ok": True, "channel": body["channel"], "ts": f"{time.time():.6f}"},
        SLACK,
        "a" * 3000 + " " + "b" * 3000 + " " + "c" * 3000,
    ),
    "messenger": Platform(
        "/v21.0/me/messages",
        lambda body: str(body["message"]["text"]),
        lambda body: {"recipient_id": body["recipient"]["id"], "message_id": f"m_{time.time()}"},
        MESSENGER,
        "a" * 2000 + " " + "b" * 2000 + " " + "c" * 10,
    ),
}


@dataclass
class FakeApi:
    """The platform's send call. A text for which ``hold`` is true is held unanswered (and not
    accepted) until ``release`` is set, then refused with a 503 nobody reads any more."""

    platform: Platform
    arrived: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    hold: Callable[[str], bool] = lambda _text: False
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.platform.send_path, self._send)
        return app

    async def _send(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = self.platform.text_of(body)
        self.arrived.append(text)
        if self.hold(text):
            self.holding.set()
            await self.release.wait()
            return web.json_response({"ok": False, "error": "service_unavailable"}, status=503)
        self.accepted.append(text)
        return web.json_response(self.platform.accepted(body))


@pytest.fixture(params=list(PLATFORMS))
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeApi, str]]:
    api = FakeApi(PLATFORMS[request.param])
    server = TestServer(api.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield api, str(server.make_url("")).rstrip("/")
    finally:
        api.release.set()  # let a held handler finish before the server closes
        await server.close()


def outbox_rows(db: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return [(row[0], row[1]) for row in conn.execute("SELECT state, parts_sent FROM outbox WHERE kind = 'reply'")]
    finally:
        conn.close()


async def wait_until(check: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s: {what()}")
        await asyncio.sleep(0.02)


async def test_kill_9_between_parts_sends_each_part_once(tmp_path: Path, fake: tuple[FakeApi, str]) -> None:
    api, api_url = fake
    platform = api.platform
    port = free_port()
    config = write_config(tmp_path, [platform.kit.endpoint(api_url)], server={"host": "127.0.0.1", "port": port})
    db = tmp_path / "gateway.db"
    gateway = GatewayProcess(config, port)

    def state() -> str:
        return f"arrived {[t[0] for t in api.arrived]}, accepted {[t[0] for t in api.accepted]}, rows {outbox_rows(db)}"

    api.hold = lambda text: text.startswith("b")  # part 2
    try:
        gateway.start()
        await gateway.wait_healthy()
        async with aiohttp.ClientSession() as http:
            status = await platform.kit.post_to(http, gateway.url, platform.kit.text(platform.text))
        assert status == 200
        await asyncio.wait_for(api.holding.wait(), 15)
        assert outbox_rows(db) == [("pending", 1)], state()  # part 1's progress committed before part 2 left
        gateway.kill()

        api.hold = lambda _text: False
        api.release.set()
        gateway.start()
        await gateway.wait_healthy()
        await wait_until(lambda: outbox_rows(db) == [("sent", 2)], 15, state)
        await asyncio.sleep(0.3)  # nothing more arrives
    finally:
        gateway.stop()

    # Each part accepted exactly once, in order (a cut's space may end the earlier part).
    assert [text.rstrip(" ") for text in api.accepted] == platform.text.split(" "), state()
    assert [text[0] for text in api.arrived] == ["a", "b", "b", "c"], state()  # only the cut-off part 2 again
