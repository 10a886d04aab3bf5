"""channels.http1: the keep-alive client the Slack adapter posts with, against real sockets on
127.0.0.1: a scripted server that writes exact bytes (framings, broken answers, closes), and an
aiohttp server with TLS for the certificate check."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from channels.http1 import BadAnswer, ConnectionFailed, Http1Client

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'

Script = Callable[["Peer", bytes], Awaitable[None]]


@dataclass
class Peer:
    """One accepted connection of the scripted server."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


@dataclass
class ScriptedServer:
    """Reads whole requests (head and Content-Length body); ``script`` answers each."""

    script: Script
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        peer = Peer(self.connections, reader, writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.script(peer, request)
                if writer.is_closing():
                    return
        finally:
            self.open_now -= 1
            writer.close()
            self.closed.set()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> ScriptedServer:
        state = ScriptedServer(script)
        server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return state

    yield start
    for server in servers:
        server.close()


async def answer_ok(peer: Peer, request: bytes) -> None:
    peer.write(OK)


async def post(client: Http1Client, body: bytes = b'{"a":1}', timeout_s: float = 5.0) -> tuple[int, bytes]:
    head = client.prepare("POST", "/api/chat.postMessage", {"Content-Type": "application/json"})
    answer = await client.request(head, body, timeout_s)
    return answer.status, answer.body


async def test_requests_reuse_one_connection_and_carry_host_and_length(scripted) -> None:
    server = await scripted(answer_ok)
    client = Http1Client(server.url)
    for _ in range(3):
        assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 1
    port = server.url.rsplit(":", 1)[1]
    first = server.requests[0]
    assert first.startswith(b"POST /api/chat.postMessage HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{port}\r\n".encode() in first
    assert first.endswith(b'Content-Length: 7\r\n\r\n{"a":1}')
    await client.aclose()


async def test_chunked_answer_in_pieces_then_the_connection_is_reused(scripted) -> None:
    async def chunked(peer: Peer, request: bytes) -> None:
        peer.write(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"ok')
        await asyncio.sleep(0.01)
        peer.write(b'\r\n7;ext=1\r\n":true}\r\n0\r\nX-Trailer: 1\r\n\r\n')

    server = await scripted(chunked)
    client = Http1Client(server.url)
    assert await post(client) == (200, b'{"ok":true}')
    assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 1
    await client.aclose()


async def test_interim_answer_is_skipped_and_headers_are_case_insensitive(scripted) -> None:
    async def interim(peer: Peer, request: bytes) -> None:
        peer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 429 Too Many Requests\r\nretry-after: 3\r\ncontent-length: 2\r\n\r\nno"
        )

    server = await scripted(interim)
    client = Http1Client(server.url)
    head = client.prepare("POST", "/x", {})
    answer = await client.request(head, b"", 5.0)
    assert (answer.status, answer.body, answer.headers["Retry-After"]) == (429, b"no", "3")
    await client.aclose()


async def test_connection_close_and_close_delimited_answers_open_a_new_connection(scripted) -> None:
    async def closing(peer: Peer, request: bytes) -> None:
        if peer.number == 1:
            peer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\none")
        else:  # no length: the body runs until the server closes
            peer.write(b"HTTP/1.1 200 OK\r\n\r\ntwo, all of it")
            peer.close()

    server = await scripted(closing)
    client = Http1Client(server.url)
    assert await post(client) == (200, b"one")
    assert await post(client) == (200, b"two, all of it")
    assert server.connections == 2
    await client.aclose()


async def test_an_http_1_0_answer_is_not_kept_alive(scripted) -> None:
    async def old(peer: Peer, request: bytes) -> None:
        peer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = await scripted(old)
    client = Http1Client(server.url)
    assert await post(client) == (200, b"ok")
    assert await post(client) == (200, b"ok")
    assert server.connections == 2
    await client.aclose()


async def test_server_closing_before_the_answer_is_connection_failed(scripted) -> None:
    async def hang_up(peer: Peer, request: bytes) -> None:
        peer.close()

    server = await scripted(hang_up)
    client = Http1Client(server.url)
    with pytest.raises(ConnectionFailed, match="before a complete answer"):
        await post(client)
    await client.aclose()


async def test_refused_connection_is_connection_failed() -> None:
    with socket.socket() as bound:  # bound, never listening: connections to it are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        client = Http1Client(f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectionFailed, match=f"cannot connect to 127.0.0.1:{port}"):
            await post(client)
        await client.aclose()


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "answer body over"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "answer head over"),
    ],
)
async def test_broken_answers_are_bad_answer_and_the_connection_is_dropped(scripted, answer, problem) -> None:
    async def broken(peer: Peer, request: bytes) -> None:
        peer.write(answer if peer.number == 1 else OK)

    server = await scripted(broken)
    client = Http1Client(server.url, max_body_bytes=1024 * 1024)
    with pytest.raises(BadAnswer, match=problem):
        await post(client)
    assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 2
    await client.aclose()


async def test_timeout_drops_the_connection_so_a_late_answer_is_never_read(scripted) -> None:
    async def slow_first(peer: Peer, request: bytes) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.3)
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        else:
            peer.write(OK)

    server = await scripted(slow_first)
    client = Http1Client(server.url)
    with pytest.raises(TimeoutError):
        await post(client, timeout_s=0.1)
    assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 2
    await client.aclose()


async def test_at_most_max_connections_are_open(scripted) -> None:
    async def slow(peer: Peer, request: bytes) -> None:
        await asyncio.sleep(0.05)
        peer.write(OK)

    server = await scripted(slow)
    client = Http1Client(server.url, max_connections=2)
    answers = await asyncio.gather(*(post(client) for _ in range(6)))
    assert answers == [(200, b'{"ok":true}')] * 6
    assert (server.connections, server.most_open) == (2, 2)
    await client.aclose()


async def test_a_dropped_connection_lets_a_waiting_request_open_its_own(scripted) -> None:
    async def hang_up_first(peer: Peer, request: bytes) -> None:
        if peer.number == 1:
            await asyncio.sleep(0.05)
            peer.close()
        else:
            peer.write(OK)

    server = await scripted(hang_up_first)
    client = Http1Client(server.url, max_connections=1)
    first, second = await asyncio.gather(post(client), post(client), return_exceptions=True)
    assert isinstance(first, ConnectionFailed)
    assert second == (200, b'{"ok":true}')
    assert (server.connections, server.most_open) == (2, 1)
    await client.aclose()


async def test_waiting_for_a_connection_counts_against_the_timeout(scripted) -> None:
    async def slow_first(peer: Peer, request: bytes) -> None:
        if len(server.requests) == 1:
            await asyncio.sleep(0.3)
        peer.write(OK)

    server = await scripted(slow_first)
    client = Http1Client(server.url, max_connections=1)
    slow = asyncio.create_task(post(client))
    await asyncio.sleep(0.05)
    with pytest.raises(TimeoutError):
        await post(client, timeout_s=0.1)  # it never got the one connection
    assert await slow == (200, b'{"ok":true}')
    assert await post(client) == (200, b'{"ok":true}')
    assert (server.connections, len(server.requests)) == (1, 2)
    await client.aclose()


async def test_requests_waiting_for_a_connection_fail_when_the_client_closes(scripted) -> None:
    async def slow(peer: Peer, request: bytes) -> None:
        await asyncio.sleep(0.2)
        peer.write(OK)

    server = await scripted(slow)
    client = Http1Client(server.url, max_connections=1)
    first = asyncio.create_task(post(client))
    waiting = asyncio.create_task(post(client))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(ConnectionFailed, match="client is closed"):
        await waiting
    assert await first == (200, b'{"ok":true}')  # a request in flight finishes
    assert server.connections == 1
    await asyncio.wait_for(server.closed.wait(), 5.0)  # and its connection is closed after it


async def test_idle_connections_close_after_the_idle_timeout(scripted) -> None:
    server = await scripted(answer_ok)
    client = Http1Client(server.url, idle_timeout_s=0.2)
    assert await post(client) == (200, b'{"ok":true}')
    await asyncio.wait_for(server.closed.wait(), 5.0)  # the client closed it, not the server
    assert server.open_now == 0
    assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 2
    await client.aclose()


async def test_an_idle_connection_the_server_closed_is_not_used_again(scripted) -> None:
    async def answer_then_close(peer: Peer, request: bytes) -> None:
        peer.write(OK)
        if peer.number == 1:
            await peer.writer.drain()
            peer.close()

    server = await scripted(answer_then_close)
    client = Http1Client(server.url)
    assert await post(client) == (200, b'{"ok":true}')
    await asyncio.wait_for(server.closed.wait(), 5.0)
    await asyncio.sleep(0.05)  # the client's loop reads the FIN
    assert await post(client) == (200, b'{"ok":true}')
    assert server.connections == 2
    await client.aclose()


async def test_prepare_refuses_headers_the_client_sets_and_line_breaks() -> None:
    client = Http1Client("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="set by the client"):
        client.prepare("POST", "/x", {"Content-Length": "3"})
    with pytest.raises(ValueError, match="line break"):
        client.prepare("POST", "/x", {"Authorization": "Bearer x\r\nX-Evil: 1"})
    with pytest.raises(ValueError, match="request path"):
        client.prepare("POST", "/x y", {})
    under_api = Http1Client("http://127.0.0.1:9/api/")
    assert under_api.prepare("POST", "chat.postMessage", {}).startswith(b"POST /api/chat.postMessage HTTP/1.1\r\n")
    assert client.prepare("GET", "/v1/me?a=b", {}).startswith(b"GET /v1/me?a=b HTTP/1.1\r\n")
    with pytest.raises(ValueError, match="not an http"):
        Http1Client("ftp://example.com")
    assert Http1Client("https://slack.com/api/").host_header == "slack.com"


# -- TLS ------------------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"]
        + ["-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return key, cert


async def test_https_verifies_the_certificate(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, "localhost")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "got": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/api/chat.postMessage", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=served)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        client = Http1Client(f"https://localhost:{server.port}", ssl_context=trusting)
        assert await post(client) == (200, b'{"ok": true, "got": "{\\"a\\":1}"}')
        await client.aclose()
        default = Http1Client(f"https://localhost:{server.port}")  # the system's store: not trusted
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await post(default)
        await default.aclose()
    finally:
        await server.close()
