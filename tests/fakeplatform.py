"""A recording stand-in for a platform's HTTP API, served by aiohttp on 127.0.0.1 port 0.

Every request is recorded (method, path, query, headers, body, when it arrived, the answer). Answers are scripted per path
with ``respond``; failures can be queued (``fail_next``) to exercise retries: 5xx, 429 with
Retry-After, slow answers. Tests wait on ``wait_for(n)`` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    answer: Answer | None = None  # what the fake answered (set once decided)
    received_at: float = field(default_factory=time.monotonic)  # when it arrived, before any delay

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.body.decode()))


@dataclass(slots=True)
class Answer:
    """A scripted answer: status, JSON (or text) body, headers, optional delay in seconds."""

    status: int = 200
    json_body: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakePlatform:
    """The fake API server. Use as ``async with FakePlatform() as api: api.url ...``."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._defaults: dict[str, Callable[[RecordedRequest], Answer]] = {}
        self._queued: dict[str, deque[Answer]] = {}
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)

    @property
    def url(self) -> str:
        """The origin to put in an endpoint's ``api_base_url``."""
        return str(self._server.make_url("")).rstrip("/")

    async def __aenter__(self) -> FakePlatform:
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.close()

    def respond(self, path: str, answer: Answer | Callable[[RecordedRequest], Answer]) -> None:
        """The default answer for ``path`` (exact path match), fixed or computed per request."""
        self._defaults[path] = answer if callable(answer) else (lambda _req, a=answer: a)

    def fail_next(self, path: str, *answers: Answer) -> None:
        """Answer the next requests to ``path`` with these, in order, before the default."""
        self._queued.setdefault(path, deque()).extend(answers)

    def to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests to ``path``."""
        return [r for r in self.requests if r.path == path]

    async def wait_for(self, count: int, path: str | None = None, timeout_s: float = 10.0) -> list[RecordedRequest]:
        """Wait until ``count`` requests (to ``path`` if given) were recorded; return them."""

        def matching() -> list[RecordedRequest]:
            return self.requests if path is None else self.to(path)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(matching()) >= count), timeout_s)
        return matching()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            body=await request.read(),
        )
        queued = self._queued.get(request.path)
        if queued:
            answer = queued.popleft()
        elif request.path in self._defaults:
            answer = self._defaults[request.path](recorded)
        else:
            answer = Answer(json_body={})
        recorded.answer = answer
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        # Recorded after the answer is decided and any delay passed: a request counts as
        # received by the platform only when it could have been processed.
        self.requests.append(recorded)
        async with self._changed:
            self._changed.notify_all()
        if answer.text is not None:
            return web.Response(status=answer.status, text=answer.text, headers=answer.headers)
        return web.json_response(answer.json_body, status=answer.status, headers=answer.headers)
