"""The baselines of ``bench/ingest.py``, each run in its own process:

    .venv/bin/python bench/ingest_servers.py {aiohttp,relay,bolt} --port PORT --api URL --secret S

- ``aiohttp``: a bare aiohttp handler that reads the body and answers 200. The ceiling of any
  aiohttp server on this machine.
- ``relay``: the floor of an echo gateway in one Python process: verify the Slack signature
  (HMAC-SHA256 over ``v0:<timestamp>:<body>``, 5-minute window), parse the JSON, answer 200,
  then post the text back to ``chat.postMessage`` with one pooled aiohttp client, at most
  ``RELAY_IN_FLIGHT`` posts in flight (the rest wait their turn). No storage, no sessions.
- ``bolt``: Slack's own Python framework, slack-bolt's ``AsyncApp`` on aiohttp, echoing every
  message with ``say()`` (installed by the ``bench`` extra of pyproject.toml).

Each serves ``POST /slack/events`` on 127.0.0.1:PORT; the API origin is ``--api``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

PATH = "/slack/events"
BOT_TOKEN = "xoxb-bench"
RELAY_IN_FLIGHT = 256


def bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(PATH, handle)
    return app


def relay_app(api: str, secret: str) -> web.Application:
    key = secret.encode()
    url = api.rstrip("/") + "/api/chat.postMessage"
    session: dict[str, aiohttp.ClientSession] = {}
    in_flight = asyncio.Semaphore(RELAY_IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()
    headers = {"Authorization": f"Bearer {BOT_TOKEN}"}

    async def http(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=RELAY_IN_FLIGHT)) as client:
            session["client"] = client
            yield
            await asyncio.gather(*tasks, return_exceptions=True)

    async def post(channel: str, text: str) -> None:
        async with in_flight:
            async with session["client"].post(url, json={"channel": channel, "text": text}, headers=headers) as answer:
                if not (await answer.json()).get("ok"):
                    raise RuntimeError("chat.postMessage refused")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            return web.Response(status=401, text="stale")
        expected = "v0=" + hmac.new(key, b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return web.Response(status=401, text="bad signature")
        payload: dict[str, Any] = json.loads(body)
        event = payload.get("event") or {}
        if payload.get("type") == "event_callback" and event.get("type") == "message" and not event.get("bot_id"):
            task = asyncio.create_task(post(event["channel"], event["text"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return web.Response(text="")

    app = web.Application()
    app.cleanup_ctx.append(http)
    app.router.add_post(PATH, handle)
    return app


def bolt_app(api: str, secret: str) -> web.Application:
    from slack_bolt.async_app import AsyncApp, AsyncSay
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(token=BOT_TOKEN, base_url=api.rstrip("/") + "/api/")
    bolt = AsyncApp(client=client, signing_secret=secret)

    @bolt.event("message")
    async def echo(event: dict[str, Any], say: AsyncSay) -> None:
        await say(event["text"])

    return bolt.web_app(path=PATH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["aiohttp", "relay", "bolt"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api", required=True, help="the fake Slack API's origin")
    parser.add_argument("--secret", required=True, help="the Slack signing secret")
    args = parser.parse_args()
    if args.kind == "aiohttp":
        app = bare_app()
    elif args.kind == "relay":
        app = relay_app(args.api, args.secret)
    else:
        app = bolt_app(args.api, args.secret)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
