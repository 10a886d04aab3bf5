"""Benchmark: webhook -> gateway -> platform API, at a fixed rate, with SQLite durability on.

    .venv/bin/python bench/delivery.py [--rate 500] [--seconds 10] [--conversations 250]
                                       [--log-level WARNING]

Signed Messenger webhooks go at a fixed rate (open loop: the schedule does not wait for
answers) from many conversations to the real gateway (``create_app`` on a config in a temp
dir: SQLite store, echo flow, one Messenger endpoint whose ``api_base_url`` is a local fake
Send API, rate limit raised so it does not cap the test). For every message the latency is
measured from just before its webhook is sent to the fake platform receiving the echo (matched
by text): p50 / p99 / max, and replies per second.

Baseline in the same run, same rate and load generator: a bare aiohttp handler that answers
200 and posts the text to the fake directly (no signature check, no store, no session). The
ratio gateway/baseline is what the gateway itself costs.

The gateway (or the baseline) runs in a child process, like a real deployment; the load
generator and the fake platform share the parent's event loop. Everything binds 127.0.0.1.
Target (issue 9, B6): p99 <= 10 ms at 500 webhooks/s (issue 4's was 30 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import yaml
from aiohttp import web

APP_SECRET = "bench-app-secret"
PAGE_TOKEN = "bench-page-token"
ENDPOINT = "fb"
SEND_PATH = "/v21.0/me/messages"


# -- what runs in the child process ----------------------------------------------------------------


def write_config(directory: Path, api_url: str, log_level: str) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"backend": "sqlite", "path": "gateway.db"},
        "flow": {"type": "echo"},
        "logging": {"level": log_level},
        "endpoints": [
            {
                "name": ENDPOINT,
                "channel": "messenger",
                "api_base_url": api_url,
                "credentials": {"app_secret": APP_SECRET, "verify_token": "v", "page_access_token": PAGE_TOKEN},
                "session": {"expiration_minutes": 30},
                "rate_limit": {"per_second": 1_000_000},  # measure the gateway, not Messenger's 300/s
            }
        ],
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def gateway_app(config: Path) -> web.Application:
    from gateway.app import create_app
    from gateway.config import load_settings

    settings = load_settings(config, environ={})
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)


async def baseline_app(api_url: str) -> web.Application:
    """Answers 200 and posts the echo to the fake platform itself: the floor for the same trip."""
    app = web.Application()
    tasks: set[asyncio.Task[None]] = set()

    async def context(app: web.Application) -> Any:
        async with aiohttp.ClientSession() as http:
            app["http"] = http
            yield
            await asyncio.gather(*tasks, return_exceptions=True)

    async def send(http: aiohttp.ClientSession, psid: str, text: str) -> None:
        body = {"recipient": {"id": psid}, "messaging_type": "RESPONSE", "message": {"text": text}}
        async with http.post(api_url + SEND_PATH, params={"access_token": PAGE_TOKEN}, json=body) as response:
            await response.read()

    async def webhook(request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        item = payload["entry"][0]["messaging"][0]
        task = asyncio.create_task(send(request.app["http"], item["sender"]["id"], item["message"]["text"]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return web.Response(text="EVENT_RECEIVED")

    app.cleanup_ctx.append(context)
    app.router.add_post(f"/webhooks/{ENDPOINT}", webhook)
    return app


def serve_child(kind: str, config: str, api_url: str, conn: Connection) -> None:
    """Child process: serve the gateway or the baseline on 127.0.0.1:0 until told to stop."""

    from gateway.collector import CollectorPacer

    if kind == "gateway":
        from gateway.serving import share_the_gil_sooner

        share_the_gil_sooner()  # as `chat-gateway serve` does (gateway/app.py)

    async def main() -> None:
        app = await (gateway_app(Path(config)) if kind == "gateway" else baseline_app(api_url))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # As `chat-gateway serve` does once started (gateway/app.py), for both servers: what
        # start-up allocated and what lives long stays out of the collector's passes.
        CollectorPacer().install()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        conn.send(runner.addresses[0][1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        await runner.cleanup()
        conn.send("stopped")

    asyncio.run(main())


# -- the parent: fake platform, load generator, figures ----------------------------------------------


@dataclass
class FakeSendApi:
    """The Messenger Send API: records when each text arrives."""

    arrived: dict[str, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived[body["message"]["text"]] = time.monotonic()
        self.changed.set()
        return web.json_response({"recipient_id": body["recipient"]["id"], "message_id": "m_bench"})


def signed_webhook(psid: str, text: str, n: int) -> tuple[bytes, dict[str, str]]:
    now_ms = int(time.time() * 1000)
    item = {
        "sender": {"id": psid},
        "recipient": {"id": "PAGE"},
        "timestamp": now_ms,
        "message": {"mid": f"m_bench_{n}", "text": text},
    }
    body = json.dumps({"object": "page", "entry": [{"id": "PAGE", "time": now_ms, "messaging": [item]}]}).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": signature}


@dataclass
class Run:
    name: str
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    answer_ms: list[float] = field(default_factory=list)  # webhook response time
    missing: int = 0
    schedule_lag_ms: float = 0.0  # how far the generator itself fell behind its schedule
    replies_per_s: float = 0.0
    metrics: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def drive(name: str, url: str, fake: FakeSendApi, rate: float, seconds: float, conversations: int) -> Run:
    """Send ``rate * seconds`` webhooks on a fixed schedule; wait for every echo (30 s at most)."""
    run = Run(name)
    total = int(rate * seconds)
    texts: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def post(http: aiohttp.ClientSession, n: int) -> None:
        text = f"{name} message {n}"
        body, headers = signed_webhook(f"PSID{n % conversations:05d}", text, n)
        started = time.monotonic()
        texts.append((text, started))
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            run.statuses[response.status] = run.statuses.get(response.status, 0) + 1
        run.answer_ms.append((time.monotonic() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = loop.time() + 0.05
        for n in range(total):
            due = start + n / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                run.schedule_lag_ms = max(run.schedule_lag_ms, -delay * 1000)
            task = asyncio.create_task(post(http, n))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending, return_exceptions=True)
        run.sent = total
        deadline = time.monotonic() + 30
        while len([t for t, _ in texts if t in fake.arrived]) < total and time.monotonic() < deadline:
            fake.changed.clear()
            try:
                await asyncio.wait_for(fake.changed.wait(), 1.0)
            except TimeoutError:
                pass
        if name == "gateway":
            async with http.get(url.replace(f"/webhooks/{ENDPOINT}", "/metrics")) as response:
                run.metrics = await response.text()
    first_sent = min(started for _, started in texts)
    arrivals = []
    for text, started in texts:
        arrived = fake.arrived.get(text)
        if arrived is None:
            run.missing += 1
        else:
            run.latencies_ms.append((arrived - started) * 1000)
            arrivals.append(arrived)
    if arrivals:
        run.replies_per_s = len(arrivals) / max(max(arrivals) - first_sent, 1e-9)
    return run


async def measure(kind: str, args: argparse.Namespace, workdir: Path) -> Run:
    fake = FakeSendApi()
    api = web.Application()
    api.router.add_post(SEND_PATH, fake.handle)
    runner = web.AppRunner(api, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    api_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    directory = workdir / kind
    directory.mkdir()
    config = write_config(directory, api_url, args.log_level)

    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_child, args=(kind, str(config), api_url, child), daemon=True
    )
    process.start()
    loop = asyncio.get_running_loop()
    port = await loop.run_in_executor(None, parent.recv)
    url = f"http://127.0.0.1:{port}/webhooks/{ENDPOINT}"
    try:
        await wait_ready(url.replace(f"/webhooks/{ENDPOINT}", "/healthz") if kind == "gateway" else None)
        return await drive(kind, url, fake, args.rate, args.seconds, args.conversations)
    finally:
        parent.send("stop")
        await loop.run_in_executor(None, lambda: parent.poll(15) and parent.recv())
        process.join(5)
        if process.is_alive():
            process.terminate()
        await runner.cleanup()


async def wait_ready(healthz: str | None) -> None:
    if healthz is None:
        return
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(healthz) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("the gateway did not become ready")


def report(run: Run) -> None:
    lat = run.latencies_ms
    print(
        f"{run.name:9s} sent {run.sent} webhooks {dict(sorted(run.statuses.items()))}, "
        f"replies {len(lat)} (missing {run.missing}), {run.replies_per_s:.0f} replies/s"
    )
    print(
        f"{'':9s} webhook -> platform latency ms: p50 {percentile(lat, 50):.1f}  p99 {percentile(lat, 99):.1f}  "
        f"max {max(lat, default=float('nan')):.1f}  mean {statistics.fmean(lat) if lat else float('nan'):.1f}"
    )
    print(
        f"{'':9s} webhook answer ms: p50 {percentile(run.answer_ms, 50):.1f}  p99 {percentile(run.answer_ms, 99):.1f}"
        f"  (load generator max lag behind schedule {run.schedule_lag_ms:.1f} ms)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="webhooks per second (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send (default 10)")
    parser.add_argument("--conversations", type=int, default=250, help="distinct senders (default 250)")
    parser.add_argument("--log-level", default="WARNING", help="the gateway's logging.level (default WARNING)")
    args = parser.parse_args(argv)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"rate {args.rate:g}/s for {args.seconds:g} s = {int(args.rate * args.seconds)} webhooks from "
        f"{args.conversations} conversations; SQLite (WAL, synchronous=NORMAL), echo flow, Messenger endpoint"
    )
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:

        async def both() -> tuple[Run, Run]:
            baseline = await measure("baseline", args, Path(tmp))
            gateway = await measure("gateway", args, Path(tmp))
            return baseline, gateway

        baseline, gateway = asyncio.run(both())
    report(baseline)
    report(gateway)
    for line in gateway.metrics.splitlines():
        if line.startswith(("gateway_messages_out_total", "gateway_events_total", "gateway_outbox_pending")):
            print(f"{'':9s} {line}")
    p99_gw, p99_base = percentile(gateway.latencies_ms, 99), percentile(baseline.latencies_ms, 99)
    p50_gw, p50_base = percentile(gateway.latencies_ms, 50), percentile(baseline.latencies_ms, 50)
    print(f"ratio gateway/baseline: p50 {p50_gw / p50_base:.1f}x  p99 {p99_gw / p99_base:.1f}x")
    ok = p99_gw <= 10.0 and gateway.missing == 0
    print(f"target p99 <= 10 ms: {'met' if ok else 'NOT met'} (p99 {p99_gw:.1f} ms, missing {gateway.missing})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
