"""A lean fake Slack Web API for the benchmarks: ``chat.postMessage`` and ``auth.test``, counted.

    .venv/bin/python bench/fake_slack.py --port PORT

Written on a bare ``asyncio.Protocol`` (HTTP/1.1 keep-alive, ``Content-Length`` bodies only)
rather than aiohttp: the fake shares two cores with the server under test and the load
generator, so the less CPU it takes per reply the less it weighs on the figures. Every server
in a run posts to the same fake, so what it costs is the same for all of them.

``GET /count`` answers ``{"posts": n, "unique": m}``: requests to ``chat.postMessage`` and the
distinct texts among them (every benchmark event carries a unique text, so ``unique`` is the
number of events answered). ``POST /reset`` sets both to zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass, field

POSTED = b'{"ok":true,"channel":"C0","ts":"1700000000.000100","message":{"text":"x"}}'
AUTH = b'{"ok":true,"url":"https://bench.slack.com/","team":"bench","user":"bot","team_id":"T1","user_id":"UBOT","bot_id":"BBOT"}'


@dataclass(slots=True)
class Tally:
    """What reached the fake."""

    posts: int = 0
    texts: set[str] = field(default_factory=set)

    def reset(self) -> None:
        self.posts = 0
        self.texts = set()


def _response(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class FakeSlackProtocol(asyncio.Protocol):
    """One client connection: requests are answered in order as soon as their body is in."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body = self._buffer[head_end + 4 : end]
            self._buffer = self._buffer[end:]
            request_line = head.split(b"\r\n", 1)[0]
            assert self._transport is not None
            self._transport.write(self._answer(request_line, body))

    def _answer(self, request_line: bytes, body: bytes) -> bytes:
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if path.endswith(b"/chat.postMessage"):
            self._tally.posts += 1
            try:
                text = json.loads(body).get("text")
            except ValueError:
                return _response(b"400 Bad Request", b'{"ok":false,"error":"invalid_json"}')
            if isinstance(text, str):
                self._tally.texts.add(text)
            return _response(b"200 OK", POSTED)
        if path.endswith(b"/auth.test"):
            return _response(b"200 OK", AUTH)
        if path == b"/count":
            counts = {"posts": self._tally.posts, "unique": len(self._tally.texts)}
            return _response(b"200 OK", json.dumps(counts).encode())
        if path == b"/reset" and method == b"POST":
            self._tally.reset()
            return _response(b"200 OK", b'{"ok":true}')
        return _response(b"404 Not Found", b'{"ok":false,"error":"unknown_method"}')


async def serve(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    server = await loop.create_server(lambda: FakeSlackProtocol(tally), "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake slack api on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
