"""Token-bucket rate limits on outbound sends: per endpoint and per conversation.

Platforms throttle senders (CHANNELS.md), so the outbox paces itself instead of collecting 429s.
Each channel declares its default limits (``channels.registry``); an endpoint's
``rate_limit.per_second`` / ``per_conversation_per_second`` replace them, None keeps the
channel's. A channel's ``scope`` says which conversations share one per-conversation bucket
(Slack: a thread ``<channel>:<thread_ts>`` shares its channel's).

Buckets allow small bursts: a per-endpoint bucket holds ``max(1, rate)`` tokens (one second's
worth), a per-conversation bucket one token. Waiting never spins: a caller sleeps exactly until
its token is due. Per-endpoint tokens are reserved in call order (a waiting caller holds its
place), so many conversations share an endpoint fairly with one sleep each. The per-conversation
bucket is checked first and taken last, at the moment of the send, so a conversation that must
wait does not hold an endpoint token others could use, and its sends stay spaced even when an
endpoint wait came between. Buckets that have refilled completely are indistinguishable from
new ones and are dropped (least recently used first), so idle conversations cost no memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from channels.base import Limits
from channels.registry import default_limits
from gateway.settings import EndpointSettings

_EPSILON = 1e-9  # float slack when comparing token counts


def limits_for(endpoint: EndpointSettings) -> Limits:
    """The endpoint's configured limits, each unset one taken from its channel's default."""
    default = default_limits(endpoint.channel)
    configured = endpoint.rate_limit
    return Limits(
        per_second=configured.per_second if configured.per_second is not None else default.per_second,
        per_conversation_per_second=(
            configured.per_conversation_per_second
            if configured.per_conversation_per_second is not None
            else default.per_conversation_per_second
        ),
        scope=default.scope,
    )


@dataclass(slots=True)
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate_per_s``; times are monotonic seconds.

    ``tokens`` may go below zero: that is a reservation, paid back by the refill before anyone
    else is served.
    """

    rate_per_s: float
    capacity: float
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, rate_per_s: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate_per_s, capacity, capacity, now)

    def _refill(self, now: float) -> None:
        if now > self.updated_at:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated_at) * self.rate_per_s)
            self.updated_at = now

    def wait_s(self, now: float) -> float:
        """Seconds until a token is available (0 when one is), without taking it."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s

    def take(self, now: float) -> float:
        """Take (or reserve) a token; the seconds until it is due, 0 when it is right now."""
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= -_EPSILON else -self.tokens / self.rate_per_s

    def give_back(self) -> None:
        """Return a reserved token that was not used (its taker was cancelled)."""
        self.tokens = min(self.capacity, self.tokens + 1.0)

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity - _EPSILON


class RateLimiter:
    """Paces sends per endpoint and per conversation. One per outbox; no module state."""

    def __init__(
        self,
        limits: Mapping[str, Limits],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._limits = {name: limit for name, limit in limits.items() if not limit.unlimited}
        self._clock = clock
        self._sleep = sleep
        now = clock()
        self._endpoints = {
            name: TokenBucket.full(limit.per_second, max(1.0, limit.per_second), now)
            for name, limit in self._limits.items()
            if limit.per_second is not None
        }
        # (endpoint, scope) -> bucket, least recently used first (see _sweep).
        self._conversations: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    @classmethod
    def for_endpoints(
        cls,
        endpoints: Iterable[EndpointSettings],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> RateLimiter:
        """A limiter with each endpoint's effective limits (``limits_for``)."""
        return cls({endpoint.name: limits_for(endpoint) for endpoint in endpoints}, clock=clock, sleep=sleep)

    def limits(self, endpoint: str) -> Limits:
        """The limits in force for ``endpoint`` (unlimited when none)."""
        return self._limits.get(endpoint, Limits())

    @property
    def tracked_conversations(self) -> int:
        """Per-conversation buckets held now (idle ones are dropped)."""
        return len(self._conversations)

    def try_acquire(self, endpoint: str, conversation: str) -> bool:
        """Count a send of ``conversation`` now if it may go without waiting; False (nothing
        taken) when it must wait, then ``acquire`` does. The usual case, without a coroutine."""
        limits = self._limits.get(endpoint)
        if limits is None:
            return True
        now = self._clock()
        endpoint_bucket = self._endpoints.get(endpoint)
        # A bucket below one token has callers waiting for it (reservations): join them.
        if endpoint_bucket is not None and endpoint_bucket.wait_s(now) > 0:
            return False
        rate_per_s = limits.per_conversation_per_second
        if rate_per_s is not None:
            bucket = self._conversation_bucket((endpoint, limits.scope(conversation)), rate_per_s)
            if bucket.wait_s(now) > 0:
                return False
            bucket.take(now)
        if endpoint_bucket is not None:
            endpoint_bucket.take(now)
        if rate_per_s is not None:
            self._sweep(now)
        return True

    async def acquire(self, endpoint: str, conversation: str) -> float:
        """Wait until ``conversation`` of ``endpoint`` may send once more, and count the send.

        Returns the seconds waited. Only the caller waits: other conversations are paced by
        their own buckets, and the endpoint's bucket serves callers in the order they came.
        """
        limits = self._limits.get(endpoint)
        if limits is None:
            return 0.0
        started = self._clock()
        rate_per_s = limits.per_conversation_per_second
        if rate_per_s is None:
            await self._endpoint_token(endpoint)
        else:
            await self._conversation_token(endpoint, (endpoint, limits.scope(conversation)), rate_per_s)
        return self._clock() - started

    async def _endpoint_token(self, endpoint: str) -> None:
        bucket = self._endpoints.get(endpoint)
        if bucket is None:
            return
        wait_s = bucket.take(self._clock())
        if wait_s > 0:
            try:
                await self._sleep(wait_s)
            except BaseException:
                bucket.give_back()
                raise

    async def _conversation_token(self, endpoint: str, key: tuple[str, str], rate_per_s: float) -> None:
        while True:
            # The bucket is looked up again after every sleep: a sweep may have replaced it.
            while (wait_s := self._conversation_bucket(key, rate_per_s).wait_s(self._clock())) > 0:
                await self._sleep(wait_s)
            await self._endpoint_token(endpoint)
            now = self._clock()
            bucket = self._conversation_bucket(key, rate_per_s)
            if bucket.wait_s(now) <= 0:
                bucket.take(now)
                self._sweep(now)
                return
            # Another conversation of the same scope (a Slack thread of this channel) took the
            # token while this one waited for the endpoint: wait for the next one.

    def _conversation_bucket(self, key: tuple[str, str], rate_per_s: float) -> TokenBucket:
        bucket = self._conversations.get(key)
        if bucket is None:
            bucket = TokenBucket.full(rate_per_s, 1.0, self._clock())
            self._conversations[key] = bucket
        else:
            self._conversations.move_to_end(key)
        return bucket

    def _sweep(self, now: float) -> None:
        """Drop refilled buckets from the least recently used end: amortised O(1) per send."""
        conversations = self._conversations
        while conversations:
            key = next(iter(conversations))
            if not conversations[key].is_full(now):
                return
            del conversations[key]
