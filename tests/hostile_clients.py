"""Hostile clients for tests/test_hostile_load.py, run in their own process so that their work
does not slow the signed client's measurements: slowloris connections, unsigned 1 MB form
floods on every webhook, header floods and unsigned request floods. Bounded in count and
time; 127.0.0.1 only. Prints one JSON line of counts when done.

    python -m tests.hostile_clients PORT SECONDS
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sys
import time
from collections import Counter

import aiohttp

SLOWLORIS = 200  # connections held at once, each re-opened when the gateway cuts it
FORM_FLOODERS = 2
HEADER_FLOODERS = 2
UNSIGNED_FLOODERS = 2
# Each flooder's ceiling, requests per second: floods hundreds of times a platform's normal
# rate, yet leaving this process some idle time, so that on a 2-core machine the test measures
# the gateway rather than the scheduler sharing one core among three busy processes.
FORMS_PER_S = 25  # 1 MB each: 50 MB/s with two flooders
HEADERS_PER_S = 100
UNSIGNED_PER_S = 150
WEBHOOKS = ("/webhooks/fb", "/webhooks/sl", "/webhooks/ln", "/webhooks/sms")
FORM = b"a=&" * (1_048_000 // 3)
UNSIGNED_BODY = b'{"object":"page","entry":[]}'


class Pace:
    """At most ``per_s`` iterations a second: ``await pace.next()`` before each."""

    def __init__(self, per_s: float) -> None:
        self._interval = 1.0 / per_s
        self._next = time.monotonic()

    async def next(self) -> None:
        self._next = max(self._next + self._interval, time.monotonic() - 1.0)
        await asyncio.sleep(max(0.0, self._next - time.monotonic()))


async def slowloris(port: int, until: float, counts: Counter[str], start_after_s: float) -> None:
    """Open a connection, send a partial head, add one byte every half second; again when cut.
    Connections start spread over ``start_after_s`` (as they would arrive from many sources)."""
    await asyncio.sleep(start_after_s)
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["slowloris_refused"] += 1
            await asyncio.sleep(0.2)
            continue
        counts["slowloris_opened"] += 1
        try:
            writer.write(b"POST /webhooks/fb HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while time.monotonic() < until:
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                        counts["slowloris_cut"] += 1
                        break
                writer.write(b"a")
        except OSError:
            counts["slowloris_cut"] += 1
        finally:
            writer.close()


async def post_flood(
    http: aiohttp.ClientSession,
    port: int,
    until: float,
    counts: Counter[str],
    *,
    kind: str,
    per_s: float,
    data: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    """POSTs of ``data`` to the webhook routes in turn, ``per_s`` a second; counted by status
    as ``<kind>_<status>``."""
    pace = Pace(per_s)
    n = 0
    while time.monotonic() < until:
        await pace.next()
        path = WEBHOOKS[n % len(WEBHOOKS)]
        n += 1
        with contextlib.suppress(aiohttp.ClientError):
            async with http.post(f"http://127.0.0.1:{port}{path}", data=data, headers=headers) as response:
                await response.read()
                counts[f"{kind}_{response.status}"] += 1


async def header_flood(port: int, until: float, counts: Counter[str]) -> None:
    """Requests with too many, and too long, headers: the parser refuses them (400)."""
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(200))
    long = b"X-Long: " + b"v" * 9000 + b"\r\n"
    pace = Pace(HEADERS_PER_S)
    n = 0
    while time.monotonic() < until:
        await pace.next()
        head = many if n % 2 == 0 else long
        n += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /webhooks/fb HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head + b"Content-Length: 0\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            counts[f"headers_{status.split(b' ')[1].decode() if status else 'closed'}"] += 1
            writer.close()
        except (OSError, TimeoutError, IndexError):
            counts["headers_error"] += 1


async def main(port: int, seconds: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    until = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        tasks = [slowloris(port, until, counts, 2.0 * n / SLOWLORIS) for n in range(SLOWLORIS)]
        forged = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "forged"}
        form = functools.partial(post_flood, kind="form", per_s=FORMS_PER_S, data=FORM, headers=forged)
        unsigned = functools.partial(post_flood, kind="unsigned", per_s=UNSIGNED_PER_S, data=UNSIGNED_BODY)
        tasks += [form(http, port, until, counts) for _ in range(FORM_FLOODERS)]
        tasks += [header_flood(port, until, counts) for _ in range(HEADER_FLOODERS)]
        tasks += [unsigned(http, port, until, counts) for _ in range(UNSIGNED_FLOODERS)]
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 10)
    return dict(counts)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))))
