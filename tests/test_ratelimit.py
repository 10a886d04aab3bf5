"""The outbound rate limiter: token buckets per endpoint and per conversation.

Unit tests run on virtual time (a clock and a sleep that only advance when every task waits),
so they are exact and instant. The end-to-end tests send real signed Slack webhooks through the
real app and time the replies' arrival at the fake Slack API.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from channels.base import Limits
from channels.registry import Channel, default_limits
from gateway.ratelimit import RateLimiter, TokenBucket, limits_for
from gateway.settings import EndpointSettings, RateLimitSettings
from tests.conftest import make_settings
from tests.fakeplatform import Answer, FakePlatform, RecordedRequest
from tests.kits.slack import POST, SLACK
from tests.test_delivery import slack_endpoint, slack_say

T = TypeVar("T")


class VirtualTime:
    """A monotonic clock and a sleep on virtual time: ``run`` advances the clock to the next
    sleeper's deadline only when every task is blocked, so waits are exact and take no time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def run(self, *work: Awaitable[T]) -> list[T]:
        tasks = [asyncio.ensure_future(w) for w in work]
        while not all(task.done() for task in tasks):
            for _ in range(20):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].cancelled():
                heapq.heappop(self._sleepers)
            if self._sleepers and not all(task.done() for task in tasks):
                deadline, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, deadline)
                future.set_result(None)
        return [task.result() for task in tasks]


def limiter(vt: VirtualTime, **limits: Limits) -> RateLimiter:
    return RateLimiter(limits, clock=vt.clock, sleep=vt.sleep)


async def send_times(vt: VirtualTime, rl: RateLimiter, endpoint: str, conversation: str, count: int) -> list[float]:
    """The virtual times at which ``count`` successive sends of one lane are allowed, asked as
    the outbox asks: ``try_acquire`` first, ``acquire`` only when that says wait."""
    times = []
    for _ in range(count):
        if not rl.try_acquire(endpoint, conversation):
            await rl.acquire(endpoint, conversation)
        times.append(vt.now)
    return times


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


# -- the bucket ---------------------------------------------------------------------------------


def test_bucket_serves_its_capacity_at_once_then_one_token_per_interval() -> None:
    bucket = TokenBucket.full(rate_per_s=4.0, capacity=2.0, now=0.0)
    assert bucket.take(0.0) == 0.0 and bucket.take(0.0) == 0.0
    assert bucket.wait_s(0.0) == pytest.approx(0.25)
    assert bucket.take(0.0) == pytest.approx(0.25)  # reserved: due in 0.25 s
    assert bucket.take(0.0) == pytest.approx(0.5)  # the next reservation queues behind it
    assert bucket.wait_s(0.5) == pytest.approx(0.25)  # both reservations paid back at 0.5 s
    assert bucket.is_full(10.0) and bucket.tokens == 2.0  # never above capacity


def test_bucket_gives_back_an_unused_reservation() -> None:
    bucket = TokenBucket.full(rate_per_s=1.0, capacity=1.0, now=0.0)
    bucket.take(0.0)
    assert bucket.take(0.0) == pytest.approx(1.0)
    bucket.give_back()
    assert bucket.wait_s(0.0) == pytest.approx(1.0)


# -- channel defaults and settings --------------------------------------------------------------


def endpoint(channel: Channel, **rate_limit: float) -> EndpointSettings:
    return EndpointSettings(name="e", channel=channel, path="/webhooks/e", rate_limit=RateLimitSettings(**rate_limit))


@pytest.mark.parametrize(
    ("channel", "per_second", "per_conversation"),
    [
        (Channel.SLACK, None, 1.0),  # about one message per second per channel
        (Channel.TWILIO, 1.0, None),  # about one segment per second per sending number
        (Channel.LINE, 2000.0, None),
        (Channel.MESSENGER, 300.0, None),
        (Channel.WEBCHAT, None, None),
    ],
)
def test_channel_defaults_apply_when_unset(channel: Channel, per_second: float, per_conversation: float) -> None:
    limits = limits_for(endpoint(channel))
    assert (limits.per_second, limits.per_conversation_per_second) == (per_second, per_conversation)
    assert limits == default_limits(channel)


def test_configured_values_replace_only_their_own_default() -> None:
    slack = limits_for(endpoint(Channel.SLACK, per_second=50.0))
    assert (slack.per_second, slack.per_conversation_per_second) == (50.0, 1.0)
    twilio = limits_for(endpoint(Channel.TWILIO, per_conversation_per_second=0.5))
    assert (twilio.per_second, twilio.per_conversation_per_second) == (1.0, 0.5)


async def test_slack_default_spaces_sends_to_one_channel_one_second_apart() -> None:
    vt = VirtualTime()
    rl = RateLimiter.for_endpoints([endpoint(Channel.SLACK)], clock=vt.clock, sleep=vt.sleep)
    [times] = await vt.run(send_times(vt, rl, "e", "C1", 4))
    assert gaps(times) == [1.0, 1.0, 1.0] and times[0] == 1000.0


async def test_slack_threads_share_their_channel_limit() -> None:
    vt = VirtualTime()
    rl = RateLimiter.for_endpoints([endpoint(Channel.SLACK)], clock=vt.clock, sleep=vt.sleep)
    channel, thread, other = await vt.run(
        send_times(vt, rl, "e", "C1", 2),
        send_times(vt, rl, "e", "C1:1700000000.000100", 2),
        send_times(vt, rl, "e", "C2", 2),
    )
    assert sorted(channel + thread) == [1000.0, 1001.0, 1002.0, 1003.0]
    assert other == [1000.0, 1001.0]  # another channel is not held up


async def test_twilio_default_paces_the_whole_endpoint_in_call_order() -> None:
    vt = VirtualTime()
    rl = RateLimiter.for_endpoints([endpoint(Channel.TWILIO)], clock=vt.clock, sleep=vt.sleep)
    first, second, third = await vt.run(*(send_times(vt, rl, "e", f"+1555000000{n}", 1) for n in range(3)))
    assert first + second + third == [1000.0, 1001.0, 1002.0]


async def test_webchat_and_unknown_endpoints_never_wait() -> None:
    vt = VirtualTime()
    rl = RateLimiter.for_endpoints([endpoint(Channel.WEBCHAT)], clock=vt.clock, sleep=vt.sleep)
    [times] = await vt.run(send_times(vt, rl, "e", "c", 100))
    [unknown] = await vt.run(send_times(vt, rl, "nope", "c", 100))
    assert set(times) == set(unknown) == {1000.0}


# -- the limiter --------------------------------------------------------------------------------


async def test_per_conversation_limit_spaces_one_conversation_and_not_the_others() -> None:
    vt = VirtualTime()
    rl = limiter(vt, sl=Limits(per_conversation_per_second=5.0))
    one, two = await vt.run(send_times(vt, rl, "sl", "C1", 5), send_times(vt, rl, "sl", "C2", 5))
    assert gaps(one) == gaps(two) == [0.2, 0.2, 0.2, 0.2]
    assert one[0] == two[0] == 1000.0  # in parallel, not one after the other


async def test_endpoint_bucket_allows_a_burst_of_one_second_then_paces() -> None:
    vt = VirtualTime()
    rl = limiter(vt, ln=Limits(per_second=2000.0))
    times = await vt.run(*(send_times(vt, rl, "ln", f"U{n}", 1) for n in range(2001)))
    flat = [t for [t] in times]
    assert flat[:2000] == [1000.0] * 2000
    assert flat[2000] == pytest.approx(1000.0005)


async def test_a_conversation_waiting_for_its_own_token_reserves_no_endpoint_token() -> None:
    """A waits 2 s for its conversation; B, who came later, is not put behind A's wait."""
    vt = VirtualTime()
    rl = limiter(vt, e=Limits(per_second=1.0, per_conversation_per_second=0.5))
    a, b = await vt.run(send_times(vt, rl, "e", "A", 2), send_times(vt, rl, "e", "B", 1))
    assert b == [1001.0]  # the endpoint's next token after A's first send
    assert a == [1000.0, 1002.0]


async def test_try_acquire_takes_nothing_when_it_says_wait() -> None:
    vt = VirtualTime()
    rl = limiter(vt, e=Limits(per_second=1.0, per_conversation_per_second=0.5))
    assert rl.try_acquire("e", "A")
    assert not rl.try_acquire("e", "A")  # A's own bucket is empty
    assert not rl.try_acquire("e", "B")  # the endpoint's one token went to A
    vt.now += 1.0
    assert rl.try_acquire("e", "B")  # B's refused try took no token from B or the endpoint
    assert not rl.try_acquire("e", "A")
    vt.now += 1.0
    assert rl.try_acquire("e", "A")  # 2 s after its first send


async def test_acquire_reports_the_seconds_waited() -> None:
    vt = VirtualTime()
    rl = limiter(vt, e=Limits(per_conversation_per_second=4.0))
    waited = await vt.run(rl.acquire("e", "c"), rl.acquire("e", "c"))
    assert waited == [0.0, pytest.approx(0.25)]


async def test_a_cancelled_waiter_gives_its_endpoint_token_back() -> None:
    vt = VirtualTime()
    rl = limiter(vt, e=Limits(per_second=1.0))
    await rl.acquire("e", "a")  # the burst token
    waiting = asyncio.ensure_future(rl.acquire("e", "b"))  # reserves the token due at +1 s
    for _ in range(5):
        await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    [times] = await vt.run(send_times(vt, rl, "e", "c", 1))
    assert times == [1001.0]  # not 1002: the cancelled reservation was returned


async def test_idle_conversation_buckets_are_dropped() -> None:
    vt = VirtualTime()
    rl = limiter(vt, sl=Limits(per_conversation_per_second=1.0))
    await vt.run(*(send_times(vt, rl, "sl", f"C{n}", 1) for n in range(10_000)))
    assert rl.tracked_conversations == 10_000  # all just used: each must wait 1 s
    vt.now += 1.0
    await vt.run(send_times(vt, rl, "sl", "C-new", 1))
    assert rl.tracked_conversations == 1  # refilled buckets are the same as new ones


async def test_waits_sleep_once_and_never_spin() -> None:
    sleeps: list[float] = []
    vt = VirtualTime()

    async def counting_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await vt.sleep(seconds)

    rl = RateLimiter({"e": Limits(per_second=10.0)}, clock=vt.clock, sleep=counting_sleep)
    await vt.run(*(send_times(vt, rl, "e", f"c{n}", 1) for n in range(30)))
    assert len(sleeps) == 20  # the 20 beyond the 10-token burst: one sleep each


# -- end to end: real webhooks, real app, fake Slack --------------------------------------------


def arrivals(api: FakePlatform) -> dict[str, list[tuple[float, str]]]:
    """Install a responder that timestamps each chat.postMessage; returns channel -> [(t, text)]."""
    seen: dict[str, list[tuple[float, str]]] = {}

    def answer(request: RecordedRequest) -> Answer:
        body = request.json()
        seen.setdefault(body["channel"], []).append((time.monotonic(), body["text"]))
        return SLACK.sent()

    api.respond(POST, answer)
    return seen


async def test_configured_per_conversation_limit_spaces_replies_but_not_conversations(
    tmp_path: Path, start_gateway: Callable[..., Any]
) -> None:
    async with FakePlatform() as api:
        seen = arrivals(api)
        settings = make_settings(tmp_path, [slack_endpoint(api.url, per_conversation_per_second=5)])
        gateway = await start_gateway(settings)
        started = time.monotonic()
        for n in range(5):
            await slack_say(gateway, "C1", f"one {n}")
            await slack_say(gateway, "C2", f"two {n}")
        await api.wait_for(10, POST, timeout_s=5)
        await gateway.settle()
    one, two = seen["C1"], seen["C2"]
    assert [text for _, text in one] == [f"one {n}" for n in range(5)]
    assert [text for _, text in two] == [f"two {n}" for n in range(5)]
    for lane in (one, two):
        assert all(gap >= 0.18 for gap in gaps([t for t, _ in lane])), gaps([t for t, _ in lane])
    # Not serialised by each other: both lanes run side by side (one after the other would
    # take at least 1.8 s, and C2's first reply would wait for C1's last).
    assert abs(two[0][0] - one[0][0]) < 0.15
    assert max(one[-1][0], two[-1][0]) - started < 1.5


async def test_slack_channel_default_applies_when_nothing_is_configured(
    tmp_path: Path, start_gateway: Callable[..., Any]
) -> None:
    async with FakePlatform() as api:
        seen = arrivals(api)
        gateway = await start_gateway(
            make_settings(tmp_path, [slack_endpoint(api.url, per_conversation_per_second=None)])
        )
        await slack_say(gateway, "C1", "first")
        await slack_say(gateway, "C1", "second")
        await slack_say(gateway, "C2", "elsewhere")
        await api.wait_for(3, POST, timeout_s=5)
    [(t1, _), (t2, _)] = seen["C1"]
    assert t2 - t1 >= 0.95  # about one message per second per channel
    assert seen["C2"][0][0] < t2  # another channel did not wait behind it
