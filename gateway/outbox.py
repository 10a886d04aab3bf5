"""Durable delivery of replies and closure notices.

Messages reach the outbox only after the store committed them (with the state change that
produced them). Each conversation is a lane: strictly FIFO, one send at a time, so replies and
notices leave in the order produced; different conversations send in parallel. A message is
marked sent only after the platform's 2xx, and that bookkeeping is shielded from cancellation.

The one window in which a send can repeat (platforms without an idempotency key): a crash
after the platform accepted a message and before the "sent" mark committed; on restart the
message is still pending and goes out again. LINE pushes carry ``X-Line-Retry-Key`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from channels.base import ChannelAdapter
from gateway.errors import DeliveryDeferred, DeliveryError, DeliverySkipped
from gateway.metrics import Metrics
from gateway.models import Change, MessageKind, OutboundMessage, OutboxState
from gateway.sessions import OutboxSink
from gateway.store.base import Store

log = logging.getLogger("gateway.outbox")


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; after ``max_attempts`` or ``max_age_s`` a dead letter."""

    max_attempts: int = 8
    max_age_s: float = 24 * 3600.0
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0

    def delay_s(self, attempts: int, retry_after_s: float | None) -> float:
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempts - 1))
        backoff *= 0.5 + random.random() / 2  # jitter: lanes that failed together retry apart
        return float(max(backoff, retry_after_s or 0.0))


@dataclass(slots=True)
class _Lane:
    messages: deque[OutboundMessage] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    parked: bool = False  # nobody to deliver to (web chat without socket) until woken


class Outbox(OutboxSink):
    """Delivers committed outbound messages through the endpoints' channel adapters."""

    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, ChannelAdapter],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._store = store
        self._adapters = adapters
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._retry = retry or RetryPolicy()
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._known: set[int] = set()  # ids queued in a lane, so a re-submit is not sent twice
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics.gauge("gateway_outbox_pending", lambda: float(len(self._known)))

    async def start(self) -> None:
        """Resume what was pending when the gateway last stopped."""
        pending = await self._store.pending_outbox()
        self.submit(pending)
        if pending:
            log.info("resuming %d pending outbound messages", len(pending))

    async def aclose(self) -> None:
        """Stop sending; what is unsent stays pending in the store for the next start."""
        if self._closing:
            return
        self._closing = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if tasks:
            # Let sends in flight finish briefly: their "sent" marks are worth keeping.
            await asyncio.wait(tasks, timeout=2.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, messages: Iterable[OutboundMessage]) -> None:
        for message in messages:
            if message.id in self._known or message.state is not OutboxState.PENDING:
                continue
            self._known.add(message.id)
            lane = self._lanes.setdefault((message.endpoint, message.conversation), _Lane())
            lane.messages.append(message)
            self._run_lane(message.endpoint, message.conversation, lane)

    def wake(self, endpoint: str, conversation: str) -> None:
        """Someone can receive again (a web chat socket connected): resume a parked lane."""
        lane = self._lanes.get((endpoint, conversation))
        if lane is not None and lane.parked:
            lane.parked = False
            self._run_lane(endpoint, conversation, lane)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every lane is empty or parked (tests and benchmarks)."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    @property
    def pending(self) -> int:
        return len(self._known)

    def _run_lane(self, endpoint: str, conversation: str, lane: _Lane) -> None:
        if lane.task is None and not lane.parked and not self._closing and lane.messages:
            self._idle.clear()
            lane.task = asyncio.create_task(self._deliver_lane(endpoint, conversation, lane))

    async def _deliver_lane(self, endpoint: str, conversation: str, lane: _Lane) -> None:
        try:
            while lane.messages and not lane.parked:
                await self._deliver(lane, lane.messages[0])
        finally:
            lane.task = None
            if not lane.messages:
                self._lanes.pop((endpoint, conversation), None)
            if all(lane.task is None for lane in self._lanes.values()):
                self._idle.set()

    async def _deliver(self, lane: _Lane, message: OutboundMessage) -> None:
        wait_s = message.next_attempt_at - self._clock()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        adapter = self._adapters.get(message.endpoint)
        try:
            if adapter is None:
                raise DeliveryError(f"endpoint {message.endpoint} is not configured", retryable=False)
            await adapter.send(message)
        except DeliveryDeferred:
            lane.parked = True
            self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome="deferred")
            return
        except DeliverySkipped as exc:
            await self._finish(lane, message, OutboxState.SKIPPED, f"skipped: {exc.reason}", exc.reason)
        except DeliveryError as exc:
            await self._failed(lane, message, exc)
        except Exception as exc:  # an adapter bug must not kill the lane: retry, then dead letter
            log.exception("adapter %s raised unexpectedly", message.endpoint)
            await self._failed(lane, message, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True))
        else:
            message.sent_at = self._clock()
            await self._finish(lane, message, OutboxState.SENT, "sent", None)

    async def _failed(self, lane: _Lane, message: OutboundMessage, exc: DeliveryError) -> None:
        message.attempts += 1
        message.last_error = exc.reason
        too_old = self._clock() - message.created_at > self._retry.max_age_s
        if exc.retryable and message.attempts < self._retry.max_attempts and not too_old:
            message.next_attempt_at = self._clock() + self._retry.delay_s(message.attempts, exc.retry_after_s)
            self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome="retry")
            log.warning(
                "send failed (attempt %d), retrying: endpoint=%s conversation=%s: %s",
                message.attempts,
                message.endpoint,
                message.conversation,
                exc.reason,
            )
            await asyncio.shield(self._store.commit(Change(outbox_updates=[message])))
            return
        await self._finish(lane, message, OutboxState.DEAD, f"failed: {exc.reason}", exc.reason)

    async def _finish(
        self, lane: _Lane, message: OutboundMessage, state: OutboxState, notice: str, error: str | None
    ) -> None:
        message.state = state
        message.last_error = error
        change = Change(outbox_updates=[message])
        if message.kind is MessageKind.CLOSURE and message.session_id:
            change.notices.append((message.session_id, notice))
        # Shielded: a shutdown must not lose the record of a message the platform accepted.
        await asyncio.shield(self._store.commit(change))
        lane.messages.popleft()
        self._known.discard(message.id)
        self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome=state.value)
        log.info(
            "message out %s: endpoint=%s conversation=%s kind=%s%s",
            state.value,
            message.endpoint,
            message.conversation,
            message.kind.value,
            f" ({error})" if error else "",
        )
