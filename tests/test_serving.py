"""Connections (DESIGN.md "Hostile input", issue #11 item 2), against a real ``chat-gateway
serve`` process on 127.0.0.1: at most ``server.max_connections`` open at once, request heads and
bodies within ``server.read_timeout_seconds``, the open-files limit raised to its hard limit,
and accept failures (out of file descriptors) logged at most once a second."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.serving import GIL_SWITCH_INTERVAL_S, share_the_gil_sooner
from tests.conftest import write_config
from tests.gateway_process import GatewayProcess, free_port


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``await serve(server={...}, preexec_fn=None)`` -> a healthy ``GatewayProcess``."""
    started: list[GatewayProcess] = []

    async def start(preexec_fn: Callable[[], None] | None = None, **server: Any) -> GatewayProcess:
        port = free_port()
        endpoints = [{"name": "web", "channel": "webchat", "session": {"expiration_minutes": 30}}]
        config = write_config(tmp_path, endpoints, server={"port": port, **server})
        process = GatewayProcess(config, port)
        started.append(process)
        process.start(preexec_fn)
        await process.wait_healthy()
        return process

    yield start
    for process in started:
        process.stop()


@contextlib.asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            opened.append(await asyncio.open_connection("127.0.0.1", port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def healthz(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as response:
        return response.status


async def test_connections_past_max_connections_are_closed_at_once(serve: Callable[..., Any]) -> None:
    gateway = await serve(max_connections=20, read_timeout_seconds=30)
    async with connections(gateway.port, 20) as held:
        async with connections(gateway.port, 1) as [(reader, _)]:
            assert await closed_within(reader, 2.0)
        assert not await closed_within(held[0][0], 0.2)  # those within the cap stay open
        for _, writer in held[:5]:
            writer.close()
        await asyncio.sleep(0)  # let the closes leave; then there is room again:
        for _ in range(50):
            with contextlib.suppress(aiohttp.ClientError):
                if await healthz(gateway.port) == 200:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no room after connections closed")


async def trickle(writer: asyncio.StreamWriter, byte: bytes) -> None:
    """A byte every 50 ms for 2 s, as a slow client sends, until the gateway cuts it."""
    with contextlib.suppress(ConnectionError):
        for _ in range(40):
            writer.write(byte)
            await writer.drain()
            await asyncio.sleep(0.05)


async def test_a_request_head_that_trickles_in_is_cut_after_read_timeout(serve: Callable[..., Any]) -> None:
    gateway = await serve(read_timeout_seconds=0.5)
    async with connections(gateway.port, 2) as [(slow, slow_writer), (silent, _)]:
        started = time.monotonic()
        slow_writer.write(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickling = asyncio.create_task(trickle(slow_writer, b"X"))
        assert await closed_within(slow, 3.0)
        assert time.monotonic() - started < 2.0
        assert await closed_within(silent, 2.0)  # connected and never said a word: cut as well
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
    assert await healthz(gateway.port) == 200


async def test_a_request_body_that_trickles_in_is_cut_after_read_timeout(serve: Callable[..., Any]) -> None:
    gateway = await serve(read_timeout_seconds=0.5)
    async with connections(gateway.port, 1) as [(reader, writer)]:
        started = time.monotonic()
        writer.write(
            b"POST /webhooks/none HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        trickling = asyncio.create_task(trickle(writer, b" "))
        assert await closed_within(reader, 3.0)
        assert time.monotonic() - started < 2.0
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)


async def test_keep_alive_connections_may_idle_longer_than_read_timeout_between_requests(
    serve: Callable[..., Any],
) -> None:
    """The head timer starts with a request's first byte, not at the end of the last answer:
    a proxy's pooled connection is not cut for being idle (aiohttp's keep-alive timeout is)."""
    gateway = await serve(read_timeout_seconds=0.3)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{gateway.url}/healthz") as response:
            assert response.status == 200
        await asyncio.sleep(0.8)  # idle, between requests, longer than the read timeout
        async with http.get(f"{gateway.url}/healthz") as response:
            assert response.status == 200
        assert len(connector._conns) <= 1


def _soft_open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line")


async def test_the_open_files_limit_is_raised_to_the_hard_limit_at_start(serve: Callable[..., Any]) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1024:
        pytest.skip(f"hard open-files limit {hard} is too low to tell")

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    gateway = await serve(preexec_fn=lower_soft_limit)
    assert gateway.process is not None
    assert _soft_open_files(gateway.process.pid) == (hard, hard)


async def test_accept_failures_out_of_descriptors_are_logged_at_most_once_a_second(
    serve: Callable[..., Any],
) -> None:
    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    gateway = await serve(preexec_fn=few_descriptors)
    size_before = gateway.log_path.stat().st_size
    async with connections(gateway.port, 100):
        await asyncio.sleep(3.0)  # the period whose log is measured
    log = gateway.log_path.read_bytes()[size_before:].decode(errors="replace")
    accept_lines = [line for line in log.splitlines() if "socket.accept() out of system resource" in line]
    assert 1 <= len(accept_lines) <= 5, f"{len(accept_lines)} accept lines, {len(log)} bytes"
    assert len(log) < 20_000
    for _ in range(100):  # descriptors are free again: it serves
        with contextlib.suppress(aiohttp.ClientError):
            if await healthz(gateway.port) == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the gateway did not recover")


def test_the_gil_switch_interval_is_shortened_for_the_store_threads() -> None:
    """``chat-gateway serve`` calls this before its loop starts (gateway/app.py ``serve``)."""
    before = sys.getswitchinterval()
    try:
        share_the_gil_sooner()
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert GIL_SWITCH_INTERVAL_S < before  # shorter than the interpreter's default of 5 ms
    finally:
        sys.setswitchinterval(before)
