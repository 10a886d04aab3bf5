"""Benchmark: the Redis backend and several instances.

    .venv/bin/python bench/scale.py [--only throughput,failover,expiry] [--messages 4000]
                                    [--concurrency 64] [--sessions 1000000] [--due 100000]

Prints, on this machine (the core count first: on 2 cores a second gateway instance competes
with Redis and with this load generator for the same two cores, so "two vs one" there shows the
cost of coordination more than any gain):

- throughput: signed Messenger webhooks (``--concurrency`` in flight, from 400 conversations)
  through real ``chat-gateway serve`` processes (echo flow) to a fake Send API in this process,
  until every reply arrived: one instance on SQLite, one on Redis, two on Redis (webhooks
  round-robin). Replies per second and webhook answer times.
- failover: two instances on Redis; 200 conversations owned by one of them, their deadlines
  spread over the 3 s after it is killed (kill -9); how late each session closes after its
  deadline (the survivor takes them over), next to the survivor's own sessions.
- expiry: ``--sessions`` open sessions in Redis, ``--due`` of them falling due within one
  second, restored and closed by the real SessionManager on the RedisStore (one process owning
  all, as after the others died; notices off): fire lag, close lag (claim committed minus
  deadline), longest event-loop stall.

Redis is the machine's (``GATEWAY_BENCH_REDIS_URL``, default redis://127.0.0.1:6379/0), under a
key prefix of this run's own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import redis
import yaml
from aiohttp import web
from delivery import APP_SECRET, ENDPOINT, PAGE_TOKEN, SEND_PATH, percentile, signed_webhook
from sessions import BULK, DUE, SilentFlow, StallMeter, lag_line, policy, seeded_changes

from gateway.collector import CollectorPacer
from gateway.models import Session
from gateway.outbox import Outbox
from gateway.sessions import SessionManager
from gateway.sessions.ownership import SoleOwner
from gateway.store.redis import RedisStore

REDIS_URL = os.environ.get("GATEWAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "bench-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def delete_prefix(prefix: str) -> None:
    with redis.Redis.from_url(REDIS_URL) as client:
        batch: list[Any] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


# -- gateway processes ------------------------------------------------------------------------------


class Node:
    """One ``chat-gateway serve`` process."""

    def __init__(self, directory: Path, api_url: str, storage: dict[str, Any], minutes: float) -> None:
        directory.mkdir(parents=True)
        self.port = free_port()
        self.log = directory / "gateway.log"
        self.config = directory / "config.yaml"
        config = {
            "server": {"host": "127.0.0.1", "port": self.port, "max_pending_events": 100_000},
            "storage": storage,
            "admin": {"token": ADMIN_TOKEN},
            "organisation": {"session": {"min_minutes": 0}},
            "flow": {"type": "echo"},
            "logging": {"level": "WARNING"},
            "endpoints": [
                {
                    "name": ENDPOINT,
                    "channel": "messenger",
                    "api_base_url": api_url,
                    "credentials": {"app_secret": APP_SECRET, "verify_token": "v", "page_access_token": PAGE_TOKEN},
                    "session": {"expiration_minutes": minutes, "on_close": {"messages": ["bye"]}},
                    "rate_limit": {"per_second": 1_000_000},
                }
            ],
        }
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def ready(self) -> None:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway not ready: {self.log.read_text()[-2000:]}")

    def instance_id(self) -> str:
        found = re.search(r"instance (\w+) joined", self.log.read_text())
        return found.group(1) if found else ""

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class FakeApi:
    """The Messenger Send API: when each (recipient, text) arrived."""

    arrived: dict[tuple[str, str], float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived[(body["recipient"]["id"], body["message"]["text"])] = time.time()
        self.changed.set()
        return web.json_response({"recipient_id": body["recipient"]["id"], "message_id": "m"})

    async def wait(self, keys: list[tuple[str, str]], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not all(k in self.arrived for k in keys):
            if time.monotonic() > deadline:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.5)
            except TimeoutError:
                pass
        return True


async def fake_api() -> tuple[FakeApi, web.AppRunner, str]:
    fake = FakeApi()
    app = web.Application()
    app.router.add_post(SEND_PATH, fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return fake, runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def post(http: aiohttp.ClientSession, node: Node, psid: str, text: str, n: int) -> int:
    body, headers = signed_webhook(psid, text, n)
    async with http.post(f"{node.url}/webhooks/{ENDPOINT}", data=body, headers=headers) as response:
        await response.read()
        return response.status


# -- throughput ---------------------------------------------------------------------------------------


async def throughput(name: str, storages: list[dict[str, Any]], args: argparse.Namespace, work: Path) -> None:
    fake, runner, api_url = await fake_api()
    nodes = [Node(work / f"{name}-{i}", api_url, storage, 30) for i, storage in enumerate(storages)]
    try:
        for node in nodes:
            node.start()
        await asyncio.gather(*(node.ready() for node in nodes))
        answers: list[float] = []
        statuses: dict[int, int] = {}
        counter = iter(range(args.messages))
        expected: list[tuple[str, str]] = []

        async def worker(http: aiohttp.ClientSession) -> None:
            for n in counter:
                psid, text = f"P{n % 400:04d}", f"{name} {n}"
                expected.append((psid, text))
                started = time.monotonic()
                status = await post(http, nodes[n % len(nodes)], psid, text, n)
                answers.append((time.monotonic() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.time()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency * 2)) as http:
            await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))
        complete = await fake.wait(expected, 60)
        last = max((fake.arrived[k] for k in expected if k in fake.arrived), default=time.time())
        replies = sum(k in fake.arrived for k in expected)
        print(
            f"{name:24s} {replies / (last - started):7.0f} replies/s  ({replies}/{len(expected)} replies"
            f"{'' if complete else ', INCOMPLETE'}; webhooks {dict(sorted(statuses.items()))}); "
            f"webhook answer p50 {percentile(answers, 50):.1f} ms p99 {percentile(answers, 99):.1f} ms"
        )
    finally:
        for node in nodes:
            node.stop()
        await runner.cleanup()


# -- failover -----------------------------------------------------------------------------------------


async def failover(prefix: str, work: Path) -> None:
    fake, runner, api_url = await fake_api()
    storage = {"backend": "redis", "url": REDIS_URL, "key_prefix": prefix}
    victim, survivor = (Node(work / f"failover-{i}", api_url, storage, 0.05) for i in range(2))  # 3 s
    store = RedisStore(REDIS_URL, prefix)
    try:
        victim.start()
        survivor.start()
        await asyncio.gather(victim.ready(), survivor.ready())
        await store.open()
        victims = [f"V{i:03d}" for i in range(200)]
        others = [f"S{i:03d}" for i in range(50)]
        async with aiohttp.ClientSession() as http:
            # Over 3 s: the deadlines (3 s after each message) spread over the 3 s after the kill.
            for i in range(200):
                await post(http, victim, victims[i], "hi", i)
                if i < 50:
                    await post(http, survivor, others[i], "hi", 1000 + i)
                await asyncio.sleep(3.0 / 200)
        victim.kill()
        killed_at = time.time()
        byes = [(p, "bye") for p in [*victims, *others]]
        await fake.wait(byes, 20)

        async def closed(psids: list[str]) -> list[Session]:
            found = []
            for psid in psids:
                found += [s for s in await store.contact_sessions(f"{ENDPOINT}:{psid}") if s.closed_at is not None]
            return found

        dead, alive = await closed(victims), await closed(others)
        after = [s for s in dead if s.expires_at is not None and s.expires_at > killed_at]
        soon = [s for s in after if s.expires_at is not None and s.expires_at <= killed_at + 1.2]
        notices = sum(1 for p in victims if (p, "bye") in fake.arrived)
        print(f"killed instance: {len(dead)} sessions closed once, {notices} notices sent once;")
        print(f"  {len(dead) - len(after)} fell due before the kill (closed by it), {len(after)} after:")

        def late(sessions: list[Session]) -> list[float]:
            return [s.closed_at - s.expires_at for s in sessions if s.closed_at and s.expires_at]

        if after:
            print("  due after the kill:         " + lag_line("close - deadline", late(after)))
        if soon:
            print("  due within 1.2 s of the kill: " + lag_line("close - deadline", late(soon)))
        print("survivor's own sessions:      " + lag_line("close - deadline", late(alive)))
    finally:
        victim.stop()
        survivor.stop()
        await store.aclose()
        await runner.cleanup()


# -- mass expiry --------------------------------------------------------------------------------------


async def mass_expiry(prefix: str, sessions: int, due: int) -> None:
    store = RedisStore(REDIS_URL, prefix)
    await store.open()
    seeded_at = time.time()
    started = time.perf_counter()
    writes = []
    for change in seeded_changes(sessions, due, seeded_at, chunk=2000):
        writes.append(store.commit(change))
        if len(writes) >= 8:
            await asyncio.gather(*writes)
            writes = []
    await asyncio.gather(*writes)
    print(f"seeded {sessions:,} open sessions into Redis in {time.perf_counter() - started:.1f} s")

    class OwnsAll(SoleOwner):
        """Every conversation is this process's (as after the other instances died); a changed
        setting's deadlines are stored, as the Redis ownership layer stores them."""

        stores_deadlines = True

        async def deadlines_moved(self, deadlines: list[tuple[str, float | None]]) -> None:
            await store.set_deadlines(deadlines)

    policies = {BULK: policy(BULK, 60.0), DUE: policy(DUE, 60.0)}
    outbox = Outbox(store, {})
    manager = SessionManager(store, SilentFlow(), outbox, policies, max_pending_events=10**9, ownership=OwnsAll())
    started = time.perf_counter()
    await manager.start()
    restore_s = time.perf_counter() - started
    print(f"restore + arm from Redis: {sessions / restore_s:,.0f} sessions/s ({restore_s:.1f} s)")
    CollectorPacer().install()  # as `chat-gateway serve` does once started, and bench/sessions.py after restore
    # Far enough ahead that storing the due sessions' new deadlines (before re-arming) is done.
    window_start = time.time() + 15.0
    manager.stats.record_lags = True
    started = time.perf_counter()
    await manager.set_policy(replace(policies[DUE], expiration_minutes=(window_start - seeded_at) / 60))
    print(f"re-arm earlier (setting shortened; deadlines stored first): {due / (time.perf_counter() - started):,.0f}/s")
    if time.time() > window_start:
        print("WARNING: the re-arm ended after the window started; the lags below include that")
    stall = StallMeter()
    stall.start()
    while manager.stats.closes_committed < due and time.time() < window_start + 60:
        await asyncio.sleep(0.05)
    await stall.stop()
    print(lag_line("fire lag (timer ran - deadline)", manager.stats.fire_lags_s))
    if manager.stats.close_lags_s:
        lags = manager.stats.close_lags_s
        print(lag_line("close lag (claim committed - deadline)", lags) + " (contract: < 100 ms)")
    print(f"longest event-loop stall during the burst: {stall.longest_s * 1000:.1f} ms")
    print(f"closed {manager.stats.closes_committed:,} of {due:,}; open sessions now {manager.open_count:,}")
    await manager.aclose()
    await outbox.aclose()
    await store.aclose()


# -- main ---------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    cores = os.cpu_count()
    print(f"cores: {cores}; redis: {shutil.which('redis-server') or 'external'} at {REDIS_URL}")
    if cores is not None and cores <= 2:
        print(
            "note: on 2 cores each extra gateway instance competes with Redis and with this load "
            "generator for the same cores: 'two vs one' measures coordination cost, not scale-out gain"
        )
    prefix = f"gwbench-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory() as directory:
            work = Path(directory)
            if "throughput" in only:
                print(f"\nthroughput: {args.messages} webhooks, {args.concurrency} in flight, echo flow")
                await throughput("1 instance, SQLite", [{"backend": "sqlite", "path": "gateway.db"}], args, work)
                redis_storage = {"backend": "redis", "url": REDIS_URL, "key_prefix": f"{prefix}-1"}
                await throughput("1 instance, Redis", [redis_storage], args, work)
                two = {"backend": "redis", "url": REDIS_URL, "key_prefix": f"{prefix}-2"}
                await throughput("2 instances, Redis", [two, two], args, work)
            if "failover" in only:
                print("\nfailover: kill -9 of the instance owning 200 conversations")
                await failover(f"{prefix}-f", work)
            if "expiry" in only:
                print(f"\nmass expiry on Redis: {args.sessions:,} open sessions, {args.due:,} due within one second")
                await mass_expiry(f"{prefix}-e", args.sessions, args.due)
    finally:
        for suffix in ("-1", "-2", "-f", "-e"):
            delete_prefix(prefix + suffix)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="throughput,failover,expiry")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
