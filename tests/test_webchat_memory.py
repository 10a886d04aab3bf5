"""Memory of the web chat under visitors who leave: 5,000 conversations each leave a kept
closure notice (the visitor says something, closes the tab, the session expires while nobody
is connected). The notices wait in the store, not in memory: the RSS of the gateway process
grows by less than 5 MB.

The process is the real app with SQLite's page cache held at 1 MiB (tests/webchat_memory_child.py
says why); SQLite's own heap is printed beside the RSS, so the figure shows what it is made of.
Before this test's change the same run grew the RSS by 18 MB (3.7 KB per conversation)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import webchat_endpoint, write_config
from tests.gateway_process import GatewayProcess, free_port

WARM_UP = 500  # allocator pools, caches and code paths first
VISITORS = 5000
CONCURRENCY = 32
BUDGET_KB = 5 * 1024


async def visit(http: aiohttp.ClientSession, url: str) -> None:
    """One visitor: a new conversation, one message, its echo, gone."""
    async with http.ws_connect(url) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "hello"
        await ws.send_json({"type": "message", "text": "I will be back later", "id": "m1"})
        while (await ws.receive_json(timeout=10))["type"] != "message":
            pass


async def visitors(http: aiohttp.ClientSession, url: str, count: int) -> None:
    remaining = iter(range(count))

    async def one_after_another() -> None:
        for _ in remaining:
            await visit(http, url)

    await asyncio.gather(*(one_after_another() for _ in range(CONCURRENCY)))


async def metric(http: aiohttp.ClientSession, base: str, line: str) -> float:
    text = await (await http.get(f"{base}/metrics")).text()
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def all_kept(http: aiohttp.ClientSession, base: str, closed: int) -> None:
    """Every session closed, and its notice tried and deferred (kept)."""
    async with asyncio.timeout(60):
        while (
            await metric(http, base, 'gateway_sessions_closed_total{endpoint="web",reason="inactivity"}') < closed
            or await metric(http, base, 'gateway_messages_out_total{endpoint="web",outcome="deferred"}') < closed
        ):
            await asyncio.sleep(0.1)


async def memory(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    result: dict[str, Any] = await (await http.get(f"{base}/_memory")).json()
    return result


async def test_5000_conversations_leaving_a_kept_notice_add_less_than_5_mb(tmp_path: Path) -> None:
    port = free_port()
    # 1.2 s: every visitor is long gone when the session expires, so every notice is kept.
    endpoint = webchat_endpoint(minutes=0.02, on_close={"messages": ["We closed this chat. Write again any time."]})
    config = write_config(
        tmp_path, [endpoint], server={"host": "127.0.0.1", "port": port}, logging={"level": "WARNING"}
    )
    gateway = GatewayProcess(config, port, module="tests.webchat_memory_child")
    gateway.start()
    try:
        await gateway.wait_healthy()
        url = f"ws://127.0.0.1:{port}/webchat/web/ws"
        async with aiohttp.ClientSession() as http:
            await visitors(http, url, WARM_UP)
            await all_kept(http, gateway.url, WARM_UP)
            before = await memory(http, gateway.url)
            started = time.monotonic()
            await visitors(http, url, VISITORS)
            await all_kept(http, gateway.url, WARM_UP + VISITORS)
            took_s = time.monotonic() - started
            after = await memory(http, gateway.url)
            in_memory = await metric(http, gateway.url, "gateway_outbox_pending")
    finally:
        gateway.stop()
    with sqlite3.connect(tmp_path / "gateway.db") as conn:
        kept = conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending' AND kind = 'closure'").fetchone()[0]
    assert kept == WARM_UP + VISITORS  # every notice is kept, in the store
    rss_kb = after["rss_kb"] - before["rss_kb"]
    sqlite_kb = after["sqlite_kb"] - before["sqlite_kb"]
    print(
        f"\n{VISITORS} conversations with a kept notice in {took_s:.1f} s: RSS +{rss_kb} KB "
        f"({rss_kb * 1024 / VISITORS:.0f} B each), SQLite's heap {sqlite_kb:+} KB"
    )
    assert rss_kb < BUDGET_KB
    assert in_memory == 0  # the outbox holds none of them
