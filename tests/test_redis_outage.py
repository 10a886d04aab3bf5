"""Redis down or slow: webhooks get 503 with Retry-After (never a 2xx for an event that is not
stored), ``/healthz`` says 503 meanwhile, and the gateway reconnects by itself when Redis is
back. A private ``redis-server`` on a free port (no persistence) is stopped and started again."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import make_settings
from tests.fakeplatform import Answer, FakePlatform
from tests.gateway_process import free_port
from tests.kits.messenger import MESSENGER, SEND_PATH
from tests.test_restart import messenger_endpoint

REDIS_SERVER = shutil.which("redis-server")


class PrivateRedis:
    """A throwaway redis-server on its own port, started and stopped at will."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed on this machine; the outage test needs its own Redis")
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    server.stop()


async def wait_status(http: aiohttp.ClientSession, url: str, status: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with http.get(url) as response:
                if response.status == status:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        await asyncio.sleep(0.1)


async def test_redis_down_means_503_with_retry_after_then_it_reconnects(
    tmp_path: Path, private_redis: PrivateRedis, start_gateway: Callable[..., Any]
) -> None:
    async with FakePlatform() as api:
        api.respond(SEND_PATH, Answer(json_body={"recipient_id": "U", "message_id": "m"}))
        settings = make_settings(
            tmp_path,
            [messenger_endpoint("fb", 5, api.url)],
            storage={"backend": "redis", "url": private_redis.url, "key_prefix": "outage"},
        )
        gateway = await start_gateway(settings)
        base = str(gateway.client.make_url(""))
        path = "/webhooks/fb"
        webhook = base + path
        async with aiohttp.ClientSession() as http:
            await wait_status(http, f"{base}/healthz", 200)
            before = MESSENGER.text("before", user="U1", event_id="m-before")
            assert await MESSENGER.post_to(http, base, before, path=path) == 200
            await api.wait_for(1, SEND_PATH)
            await gateway.outbox.drain()  # its "sent" mark is stored before Redis goes

            private_redis.stop()
            during = MESSENGER.text("during", user="U1", event_id="m-during")
            assert await MESSENGER.post_to(http, base, during, path=path) == 503  # not stored: never a 2xx
            headers = {"Content-Type": MESSENGER.content_type, **MESSENGER.sign(during.body, webhook)}
            async with http.post(webhook, data=during.body, headers=headers) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "5"
            await wait_status(http, f"{base}/healthz", 503)
            async with http.get(f"{base}/healthz") as response:  # why, through Store.check_writable
                health = await response.json()
            assert health["status"] == "store cannot write" and "redis" in health["reason"], health

            await private_redis.start()  # back (empty: this one keeps nothing on disk)
            await wait_status(http, f"{base}/healthz", 200)
            # The platform's redelivery of the refused event is now stored and answered.
            assert await MESSENGER.post_to(http, base, during, path=path) == 200
            await api.wait_for(2, SEND_PATH)
            texts = [r.json()["message"]["text"] for r in api.to(SEND_PATH)]
            assert texts == ["before", "during"]
