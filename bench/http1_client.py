"""Benchmark: what one send call costs, aiohttp's ``ClientSession.post`` against ``Http1Client``.

    .venv/bin/python bench/http1_client.py [--posts 6000] [--in-flight 16] [--rounds 3]

Both post the same small JSON body (the Slack adapter's ``chat.postMessage``: bearer token,
JSON content type) to one fake Slack Web API (``bench/fake_slack.py``, its own process), at most
``--in-flight`` at a time, and read and parse each answer. Printed per client: CPU time of this
process per post (the figure that matters: the gateway's event loop pays it per reply) and
posts per second. The clients alternate, ``--rounds`` times each, after 300 warm-up posts.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import orjson
from ingest import free_port

from channels.http1 import Http1Client

BENCH = Path(__file__).resolve().parent
HEADERS = {"Content-Type": "application/json;charset=utf-8", "Authorization": "Bearer xoxb-bench"}
WARMUP = 300

Post = Callable[[int], Awaitable[None]]


async def with_aiohttp(origin: str, in_flight: int, run: Callable[[Post], Awaitable[None]]) -> None:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as http:

        async def post(number: int) -> None:
            body = orjson.dumps({"channel": "D1", "text": f"t{number}"})
            async with http.post(origin + "/api/chat.postMessage", data=body, headers=HEADERS, timeout=timeout) as r:
                assert orjson.loads(await r.read())["ok"]

        await run(post)


async def with_http1(origin: str, in_flight: int, run: Callable[[Post], Awaitable[None]]) -> None:
    client = Http1Client(origin, max_connections=in_flight)
    head = client.prepare("POST", "/api/chat.postMessage", HEADERS)

    async def post(number: int) -> None:
        body = orjson.dumps({"channel": "D1", "text": f"t{number}"})
        answer = await client.request(head, body, 10.0)
        assert orjson.loads(answer.body)["ok"]

    try:
        await run(post)
    finally:
        await client.aclose()


def measuring(posts: int, in_flight: int, out: list[tuple[float, float]]) -> Callable[[Post], Awaitable[None]]:
    async def run(post: Post) -> None:
        gate = asyncio.Semaphore(in_flight)

        async def one(number: int) -> None:
            async with gate:
                await post(number)

        await asyncio.gather(*(one(n) for n in range(WARMUP)))
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(posts)))
        out.append((time.process_time() - cpu, time.perf_counter() - wall))

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=6000)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    port = free_port()
    fake = subprocess.Popen([sys.executable, str(BENCH / "fake_slack.py"), "--port", str(port)], stdout=subprocess.PIPE)
    try:
        assert fake.stdout is not None
        fake.stdout.readline()  # "fake slack api on ..." once it listens
        origin = f"http://127.0.0.1:{port}"
        results: dict[str, list[tuple[float, float]]] = {"aiohttp": [], "http1": []}
        clients = {"aiohttp": with_aiohttp, "http1": with_http1}
        for _ in range(args.rounds):
            for name, client in clients.items():
                asyncio.run(client(origin, args.in_flight, measuring(args.posts, args.in_flight, results[name])))
    finally:
        fake.terminate()
        fake.wait()
    print(f"{args.posts} posts per round, {args.in_flight} in flight, {args.rounds} rounds, alternating")
    for name, runs in results.items():
        cpu_us = [cpu / args.posts * 1e6 for cpu, _ in runs]
        rates = [args.posts / wall for _, wall in runs]
        cpu_text, rate_text = " ".join(f"{x:.0f}" for x in cpu_us), " ".join(f"{x:.0f}" for x in rates)
        print(f"{name:8} CPU us/post: {cpu_text}   posts/s: {rate_text}")
    ratio = sorted(a[0] / b[0] for a, b in zip(results["aiohttp"], results["http1"], strict=True))
    print(f"ratio aiohttp/http1 CPU per post (median of rounds): {ratio[len(ratio) // 2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
