"""Wall-clock steps (DESIGN.md "Hostile input", issue #11 item 12): deadlines are wall-clock,
so after the clock steps a session still closes within 5 s of its wall-clock deadline. The
wall clock is injected (``create_app(clock=...)``) and stepped; the loop's clock runs on. The
sessions are real web chat conversations over a WebSocket, on real SQLite."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tests.conftest import ChatClient, Gateway, make_settings, webchat_endpoint


class SteppedClock:
    """The wall clock, plus a step the test sets (as NTP or ``date -s`` would)."""

    def __init__(self) -> None:
        self.step_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.step_s


async def wait_rearms(gateway: Gateway, count: int, timeout_s: float = 10.0) -> None:
    """Until the session timers re-armed themselves ``count`` times (a counter of the core)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while gateway.manager.stats.timer_rearms < count:
        if loop.time() > deadline:
            raise TimeoutError("the timer never fired early")
        await asyncio.sleep(0.02)


async def test_a_step_forward_closes_an_overdue_session_within_5_s(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    clock = SteppedClock()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=10)]), clock=clock)
    chat: ChatClient = await open_chat(gateway, "fwd")
    await chat.say("hello")
    await chat.wait_messages(1, "reply")
    clock.step_s = 3600.0  # ten minutes of silence passed, says the wall clock, and then some
    stepped_at = time.monotonic()
    await chat.wait_messages(1, "closure", timeout_s=6.0)
    assert time.monotonic() - stepped_at < 5.0


async def test_a_step_back_then_forward_still_closes_on_the_wall_clock_deadline(
    tmp_path: Path, start_gateway: Any, open_chat: Any
) -> None:
    """The clock steps back an hour (the timer, firing, finds the session an hour from due and
    re-arms for an hour), then is corrected forward: the session is due now, not in an hour."""
    clock = SteppedClock()
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0.02)]), clock=clock)
    chat: ChatClient = await open_chat(gateway, "back")
    await chat.say("hello")
    await chat.wait_messages(1, "reply")
    clock.step_s = -3600.0
    await wait_rearms(gateway, 1)  # fired at its loop time, found the session not due (wall)
    assert chat.messages("closure") == []
    clock.step_s = 0.0
    corrected_at = time.monotonic()
    await chat.wait_messages(1, "closure", timeout_s=6.0)
    assert time.monotonic() - corrected_at < 5.0
    [session] = await gateway.store.contact_sessions(f"web:{chat.conversation}")
    assert session.close_reason == "inactivity"
