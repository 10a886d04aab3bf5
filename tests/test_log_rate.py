"""``gateway.log_rate``: a repeating error is logged at most once a second per kind, and the
ones left out are counted, in the next line of the kind or on their own a second later. The
clock is injected; the one-second flush waits on the real loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.log_rate import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.rate"]


def test_one_line_a_second_per_kind_with_the_count_of_the_others(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.rate"), clock=clock)
    for _ in range(1000):
        limited.warning("a", "rejected %s", "a")
    limited.warning("b", "rejected %s", "b")  # another kind: its own budget
    clock.now += 1.0
    limited.warning("a", "rejected %s", "a")
    assert messages(caplog) == ["rejected a", "rejected b", "rejected a (and 999 more like it in the last second)"]


async def test_the_count_goes_out_on_its_own_when_the_flood_stops(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    limited = RateLimitedLog(logging.getLogger("test.rate"), every_s=0.05)
    for _ in range(10):
        limited.warning("slow", "cut %d", 1)
    async with asyncio.timeout(5):
        while len(messages(caplog)) < 2:
            await asyncio.sleep(0.01)
    assert messages(caplog) == ["cut 1", "9 more like it in the last second: slow"]
