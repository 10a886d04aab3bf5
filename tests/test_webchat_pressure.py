"""The web chat's own back-pressure budget (DESIGN.md "Web chat in public"): with
``server.max_pending_events: 3`` and the flow held on its gate, a web chat flood fills the web
chat's budget (the excess gets ``overloaded`` error frames and no ack) while signed LINE
webhooks still get 200 from a budget of their own; once the flow is released the refused web
chat messages, resent as the page does, are taken and answered once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_settings, webchat_endpoint
from tests.fakeplatform import FakePlatform
from tests.kits.line import LINE, LineApi, line_api_with_once_rules
from tests.scripted_flow import ScriptedFlow
from tests.test_overload import post

BOUND = 3


@pytest.fixture
async def line_api() -> AsyncIterator[tuple[FakePlatform, LineApi]]:
    async with line_api_with_once_rules() as fake_and_api:
        yield fake_and_api


async def test_a_web_chat_flood_never_makes_a_platform_webhook_answer_503(
    tmp_path: Path, line_api: tuple[FakePlatform, LineApi], start_gateway: Any, open_chat: Any
) -> None:
    fake, api = line_api
    flow = ScriptedFlow()
    flow.gate = asyncio.Event()  # every turn waits here: accepted events pile up unhandled
    endpoints = [LINE.endpoint(fake.url, minutes=30), webchat_endpoint(minutes=0)]
    gateway = await start_gateway(make_settings(tmp_path, endpoints, server={"max_pending_events": BOUND}), flow=flow)
    try:
        chats = [await open_chat(gateway, f"flood{c}") for c in range(2)]
        sent = [(chat, f"{c}-{n}") for n in range(5) for c, chat in enumerate(chats)]
        for chat, message_id in sent:
            await chat.say(f"text {message_id}", id=message_id)
        for chat in chats:
            await chat.wait_for(lambda frames, chat=chat: len(chat.acks()) + len(chat.of_type("error")) == 5)
        acked = [i for chat in chats for i in chat.acks()]
        refused = [f["id"] for chat in chats for f in chat.of_type("error")]
        assert len(acked) == BOUND and len(refused) == len(sent) - BOUND
        assert all(f["reason"] == "overloaded" for chat in chats for f in chat.of_type("error"))
        assert gateway.metrics.value("gateway_events_total", endpoint="web", outcome="overloaded") == len(refused)

        # The platform's webhooks are not held back by the web chat's backlog.
        statuses = [(await post(gateway, f"U{n}", f"line {n}", f"EV-{n}"))[0] for n in range(BOUND + 1)]
        assert statuses == [200] * BOUND + [503]  # its own budget, just as bounded
        assert gateway.metrics.value("gateway_events_total", endpoint="ln", outcome="overloaded") == 1

        flow.gate.set()
        await gateway.settle()
        for chat, message_id in sent:  # what the page does with messages it has no ack for
            if message_id in refused:
                await chat.say(f"text {message_id}", id=message_id)
                await chat.wait_for(lambda frames, chat=chat, message_id=message_id: message_id in chat.acks())
        for chat in chats:
            await chat.wait_messages(5, "reply")
        await gateway.settle()
        replies = sorted(text for chat in chats for text in chat.messages("reply"))
        assert replies == sorted(f"text {message_id}" for _chat, message_id in sent)  # each once
        assert sorted(d.text for d in api.deliveries) == [f"line {n}" for n in range(BOUND)]
    finally:
        flow.gate.set()
