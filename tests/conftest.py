"""Shared fixtures: a real configuration file per test, the real app behind a real HTTP
server on 127.0.0.1, and a web chat client speaking the WebSocket contract."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import load_settings
from gateway.keys import MANAGER, METRICS, OUTBOX, STORE
from gateway.metrics import Metrics
from gateway.outbox import Outbox
from gateway.sessions import SessionManager
from gateway.settings import Settings
from gateway.store.base import Store
from tests.fakeplatform import FakePlatform

if TYPE_CHECKING:
    from tests.kits import Kit

ADMIN_TOKEN = "test-admin-token"


pytest_plugins = ["tests.browser", "tests.redis_kit"]  # `browser` (headless Chromium), `redis_prefix`


# Tests open many conversations from 127.0.0.1; the per-address limit has tests of its own.
TEST_WEBCHAT = {"max_new_conversations_per_hour": 100_000}


def webchat_endpoint(
    name: str = "web", minutes: float = 0.01, *, webchat: dict[str, Any] | None = None, **session: Any
) -> dict[str, Any]:
    """A web chat endpoint entry for ``write_config``; ``webchat`` merges into its ``webchat:`` block."""
    return {
        "name": name,
        "channel": "webchat",
        "session": {"expiration_minutes": minutes, **session},
        "webchat": {**TEST_WEBCHAT, **(webchat or {})},
    }


def write_config(directory: Path, endpoints: list[dict[str, Any]], **sections: Any) -> Path:
    """Write a config file (bounds open down to 0, admin on) and return its path."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"backend": "sqlite", "path": "gateway.db"},
        "admin": {"token": ADMIN_TOKEN},
        "organisation": {"session": {"min_minutes": 0, "max_minutes": 20160}},
        "flow": {"type": "echo"},
        "endpoints": endpoints,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_settings(directory: Path, endpoints: list[dict[str, Any]], **sections: Any) -> Settings:
    return load_settings(write_config(directory, endpoints, **sections), environ={})


@dataclass
class Gateway:
    """A running gateway app and an HTTP client to it."""

    client: TestClient[web.Request, web.Application]
    app: web.Application

    @property
    def manager(self) -> SessionManager:
        return self.app[MANAGER]

    @property
    def outbox(self) -> Outbox:
        return self.app[OUTBOX]

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def admin_get(self, path: str) -> Any:
        response = await self.client.get(path, headers=self.admin_headers())
        assert response.status == 200, await response.text()
        return await response.json()

    async def bot_message(self, endpoint: str, conversation: str, text: str) -> dict[str, Any]:
        """``POST /admin/messages`` (S13): a bot-initiated message; asserts the 202 and returns
        the session it went to."""
        body = {"endpoint": endpoint, "conversation": conversation, "text": text}
        response = await self.client.post("/admin/messages", json=body, headers=self.admin_headers())
        assert response.status == 202, await response.text()
        session: dict[str, Any] = (await response.json())["session"]
        return session

    async def settle(self) -> None:
        """Wait until inbound work and deliveries are done."""
        await self.manager.drain()
        await self.outbox.drain()


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """``await serve_app(app)`` -> a running ``Gateway`` for an app built by the test itself;
    stopped at teardown."""
    running: list[TestClient[web.Request, web.Application]] = []

    async def serve(app: web.Application, *, port: int = 0) -> Gateway:
        client = TestClient(TestServer(app, host="127.0.0.1", port=port))
        await client.start_server()
        running.append(client)
        return Gateway(client, app)

    yield serve
    for client in reversed(running):
        await client.close()


@pytest.fixture
def start_gateway(serve_app: Callable[..., Awaitable[Gateway]]) -> Callable[..., Any]:
    """``await start_gateway(settings, port=0, **create_app_overrides)`` -> a running ``Gateway``."""

    async def start(settings: Settings, *, port: int = 0, **overrides: Any) -> Gateway:
        return await serve_app(create_app(settings, **overrides), port=port)

    return start


@pytest.fixture
async def serve_http() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await serve_http(handler, path="/flow")`` -> the URL of a POST ``handler`` served on
    127.0.0.1 (an http flow, a close script); stopped at teardown."""
    servers: list[TestServer] = []

    async def serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]], path: str = "/flow") -> str:
        app = web.Application()
        app.router.add_post(path, handler)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return str(server.make_url(path))

    yield serve
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def echo_flow_url(serve_http: Callable[..., Awaitable[str]]) -> str:
    """An http flow backend that answers ``flow: <the event's text>``."""

    async def flow(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return web.json_response({"replies": [{"text": f"flow: {body['event']['text']}"}]})

    return await serve_http(flow)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for tests that call a server directly (a channel adapter's sends)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def api(kit: Kit) -> AsyncIterator[FakePlatform]:
    """The recording fake API of the platform kit ``kit`` (``tests.kits``), which a test module
    or test provides as a fixture or parameter."""
    async with kit.fake_api() as fake:
        yield fake


@pytest.fixture
async def gateway(kit: Kit, api: FakePlatform, tmp_path: Path, start_gateway: Callable[..., Any]) -> Gateway:
    """A gateway with the kit's endpoint alone on its fake API (sessions never expire);
    tests that need other settings call ``start_gateway`` themselves."""
    started: Gateway = await start_gateway(kit.settings(tmp_path, api))
    return started


@dataclass
class ChatClient:
    """One browser tab of the web chat: sends frames, collects what the server sends.

    ``conversation`` and ``token`` come from the server's hello (``wait_hello``).
    """

    ws: aiohttp.ClientWebSocketResponse
    frames: list[dict[str, Any]] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(message.data))
                async with self._changed:
                    self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_hello(self, timeout_s: float = 10.0) -> dict[str, Any]:
        await self.wait_for(lambda frames: any(f["type"] == "hello" for f in frames), timeout_s)
        return self.of_type("hello")[0]

    @property
    def conversation(self) -> str:
        return str(self.of_type("hello")[0]["conversation"])

    @property
    def token(self) -> str:
        return str(self.of_type("hello")[0]["token"])

    async def say(self, text: str, id: str | None = None) -> None:
        frame = {"type": "message", "text": text}
        if id is not None:
            frame["id"] = id
        await self.ws.send_json(frame)

    async def refresh(self) -> None:
        await self.ws.send_json({"type": "refresh"})

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    def messages(self, kind: str | None = None) -> list[str]:
        return [f["text"] for f in self.frames if f["type"] == "message" and (kind is None or f["kind"] == kind)]

    def sessions(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "session"]

    def acks(self) -> list[str]:
        return [f["id"] for f in self.frames if f["type"] == "ack"]

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 10.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.frames)), timeout_s)

    async def wait_messages(self, count: int, kind: str | None = None, timeout_s: float = 10.0) -> list[str]:
        await self.wait_for(lambda _frames: len(self.messages(kind)) >= count, timeout_s)
        return self.messages(kind)

    async def close(self) -> None:
        await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def open_chat() -> AsyncIterator[Callable[..., Any]]:
    """``await open_chat(gateway, label, endpoint="web")`` -> a connected ChatClient that got
    its hello. The first socket of a label gets a new conversation from the server; later ones
    with the same label (also on a restarted gateway) resume it with its id and token, as the
    page does. ``chat.conversation`` is the server's id."""
    clients: list[ChatClient] = []
    issued: dict[tuple[str, str], tuple[str, str]] = {}

    async def connect(gateway: Gateway, label: str, endpoint: str = "web", **ws_options: Any) -> ChatClient:
        known = issued.get((endpoint, label))
        params = {"conversation": known[0], "token": known[1]} if known else {}
        ws = await gateway.client.ws_connect(f"/webchat/{endpoint}/ws", params=params, **ws_options)
        chat = ChatClient(ws)
        chat.start()
        clients.append(chat)
        await chat.wait_hello()
        issued[(endpoint, label)] = (chat.conversation, chat.token)
        return chat

    yield connect
    for chat in clients:
        await chat.close()
