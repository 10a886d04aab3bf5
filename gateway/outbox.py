"""Durable delivery of replies and closure notices.

Messages reach the outbox only after the store committed them (with the state change that
produced them). Each conversation is a lane: strictly FIFO, one send at a time, so replies and
notices leave in the order produced; different conversations send in parallel, each lane in its
own task, so one lane waiting (for a retry, a rate-limit token, a slow platform) holds up only
itself. Before each send a lane waits for its rate-limit tokens (``gateway.ratelimit``: per
endpoint, per conversation). A message stays at the head of its lane until its outcome is final
and stored: what each attempt came to (sent, skipped, a retry scheduled, a dead letter, the parts
sent so far) is committed by ``gateway.outbox_outcomes``, which documents the outcomes and the one
window in which a send can repeat.

Kept messages (``holding_channels``, the web chat): when nobody can receive a message
(``DeliveryDeferred``) its lane forgets it and everything queued behind it; they stay pending
in the store only, capped at the adapter's ``keep`` per conversation (older ones are dropped,
counted as ``outcome="dropped"``). ``wake`` reads the conversation's pending messages back from
the store when someone connects, and the lane, between two sends, merges them in id order
(= the order produced) before it calls the waker's ``ready``: the new client joins exactly
behind them. At start these channels' messages are not loaded at all. So a conversation nobody
reads costs no memory, however many of them there are.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from channels.base import ChannelAdapter
from gateway.errors import DeliveryDeferred, DeliveryError, DeliverySkipped, MessageNotDead, MessageNotFound
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import Change, MessageKind, OutboundMessage, OutboxState
from gateway.outbox_outcomes import OutcomeRecorder, RetryPolicy
from gateway.ratelimit import RateLimiter
from gateway.sessions import OutboxSink
from gateway.store.base import Store

log = logging.getLogger("gateway.outbox")

CLOSE_GRACE_S = 2.0  # how long aclose lets sends in flight finish


@dataclass(slots=True)
class _Lane:
    messages: deque[OutboundMessage] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    sending: bool = False  # a request is with the platform (or its outcome being recorded)
    reload: bool = False  # woken: read the conversation's kept messages from the store first
    ready: list[Callable[[], None]] = field(default_factory=list)  # wakers, called after the reload


class Outbox(OutboxSink):
    """Delivers committed outbound messages through the endpoints' channel adapters.

    ``clock`` is wall-clock seconds (``next_attempt_at`` and ages persist); the rate limiter
    keeps its own monotonic clock.
    """

    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, ChannelAdapter],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
        forward: Callable[[OutboundMessage], Awaitable[bool]] | None = None,
        resume_all: bool = True,
        holding_channels: Collection[str] = (),
    ) -> None:
        self._store = store
        # Several instances: a retried dead letter goes to its conversation's owner (forward
        # says True), and at start only the conversations taken over are resumed (resume_all).
        self._forward = forward
        self._resume_all = resume_all
        self._holding = frozenset(holding_channels)
        self._adapters = adapters
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._outcomes = OutcomeRecorder(store, self._metrics, clock, retry or RetryPolicy())
        self._limiter = limiter or RateLimiter({})
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._known: set[int] = set()  # ids queued in a lane, so a re-submit is not sent twice
        self._closing = False
        self._running = 0  # lanes with a task
        self._idle = asyncio.Event()
        self._idle.set()
        self._retry_lock = asyncio.Lock()  # dead-letter retries, one at a time
        self._metrics.gauge("gateway_outbox_pending", lambda: float(len(self._known)))

    async def start(self) -> None:
        """Resume what was pending when the gateway last stopped (kept messages of holding
        channels stay in the store until their conversation wakes; with several instances, the
        owners of the conversations resume theirs when they take them over)."""
        if not self._resume_all:
            return
        pending = await self._store.pending_outbox(skip_channels=self._holding)
        self.submit(pending)
        if pending:
            log.info("resuming %d pending outbound messages", len(pending))

    async def aclose(self) -> None:
        """Stop sending; what is unsent stays pending in the store for the next start.

        Lanes that only wait (a retry's delay, a rate-limit token) stop at once; sends in
        flight get ``CLOSE_GRACE_S`` to finish, since their "sent" marks are worth keeping.
        Safe to call twice.
        """
        if self._closing:
            return
        self._closing = True
        lanes = [lane for lane in self._lanes.values() if lane.task is not None]
        for lane in lanes:
            if not lane.sending and lane.task is not None:
                lane.task.cancel()
        in_flight = [lane.task for lane in lanes if lane.sending and lane.task is not None]
        if in_flight:
            await asyncio.wait(in_flight, timeout=CLOSE_GRACE_S)
        tasks = [lane.task for lane in lanes if lane.task is not None]
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

    def wake(self, endpoint: str, conversation: str, ready: Callable[[], None] | None = None) -> None:
        """Someone can receive again (a web chat socket connected): the conversation's lane
        reads its kept messages from the store, merges them in order, then calls ``ready()``
        (between two sends, so whoever it admits gets every later message, in order)."""
        if self._closing:
            return
        lane = self._lanes.setdefault((endpoint, conversation), _Lane())
        lane.reload = True
        if ready is not None:
            lane.ready.append(ready)
        self._run_lane(endpoint, conversation, lane)

    async def retry(self, message_id: int) -> OutboundMessage:
        """Send a dead letter again: back to pending with 0 attempts, due now, at the end of
        its conversation's lane. Its closure notice (if it is one) reads ``queued`` again.

        Raises ``MessageNotFound`` for an unknown id and ``MessageNotDead`` when it is not a
        dead letter (so two concurrent retries send it once).
        """
        async with self._retry_lock:
            message = await self._store.get_outbound(message_id)
            if message is None:
                raise MessageNotFound(f"no outbound message {message_id}")
            if message.state is not OutboxState.DEAD or message.id in self._known:
                raise MessageNotDead(f"message {message_id} is {message.state.value}, not dead")
            message.state = OutboxState.PENDING
            message.attempts = 0
            message.next_attempt_at = self._clock()
            change = Change(outbox_updates=[message])
            if message.kind is MessageKind.CLOSURE and message.session_id:
                change.notices.append((message.session_id, "queued"))
            await asyncio.shield(self._store.commit(change))
            self._metrics.inc("gateway_dead_letters_retried_total", endpoint=message.endpoint)
            log.info(
                "dead letter %d queued again: endpoint=%s",
                message.id,
                message.endpoint,
                extra=log_context(message.endpoint, message.conversation, message.session_id),
            )
            if self._forward is None or not await self._forward(message):
                self.submit([message])
        return message

    async def delete(self, message_id: int) -> None:
        """Drop a dead letter for good. Raises ``MessageNotFound`` for an unknown id and
        ``MessageNotDead`` when it is not a dead letter (a pending one is never dropped)."""
        async with self._retry_lock:  # not while a retry of it is on its way
            message = await self._store.get_outbound(message_id)
            if message is None:
                raise MessageNotFound(f"no outbound message {message_id}")
            if message.state is not OutboxState.DEAD or message.id in self._known:
                raise MessageNotDead(f"message {message_id} is {message.state.value}, not dead")
            if not await self._store.delete_dead_letter(message_id):
                raise MessageNotDead(f"message {message_id} changed meanwhile")
            log.info(
                "dead letter %d deleted",
                message_id,
                extra=log_context(message.endpoint, message.conversation, message.session_id),
            )

    def forget(self, endpoint: str, conversation: str) -> int:
        """Drop the messages queued for a conversation whose contact was erased (their rows
        are gone); a send already with the platform finishes. Returns how many were dropped."""
        lane = self._lanes.get((endpoint, conversation))
        if lane is None:
            return 0
        if lane.task is not None and not lane.sending:
            lane.task.cancel()  # it only waits (a retry's delay, a rate-limit token)
        keep = 1 if lane.sending and lane.messages else 0
        dropped = [lane.messages.pop() for _ in range(len(lane.messages) - keep)]
        for message in dropped:
            self._known.discard(message.id)
        return len(dropped)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every lane is empty or waits for its conversation (tests and benchmarks)."""
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    @property
    def pending(self) -> int:
        return len(self._known)

    def _run_lane(self, endpoint: str, conversation: str, lane: _Lane) -> None:
        if lane.task is None and not self._closing and (lane.messages or lane.reload):
            self._idle.clear()
            self._running += 1
            lane.task = asyncio.create_task(self._deliver_lane(endpoint, conversation, lane))
            lane.task.add_done_callback(functools.partial(self._lane_done, endpoint, conversation, lane))

    async def _deliver_lane(self, endpoint: str, conversation: str, lane: _Lane) -> None:
        while not self._closing:
            if lane.reload:
                await self._reload(endpoint, conversation, lane)
            if not lane.messages:
                return
            if await self._deliver(lane, lane.messages[0]):
                continue
            # Deferred: the lane's messages stay in the store only. When someone connected
            # meanwhile (``reload``), the next turn reads them back, without the dropped ones.
            for message in lane.messages:
                self._known.discard(message.id)
            lane.messages.clear()

    async def _reload(self, endpoint: str, conversation: str, lane: _Lane) -> None:
        """Merge the conversation's kept messages into the lane in id order (the order they were
        produced: one conversation's changes commit one at a time), then admit the wakers."""
        lane.reload = False
        try:
            kept = await self._store.pending_outbox_of(endpoint, conversation)
        except Exception:  # the wakers still join; what is kept waits for the next wake
            log.exception("cannot read the kept messages of %s/%s", endpoint, conversation)
            kept = []
        fresh = [message for message in kept if message.id not in self._known]
        if fresh:
            self._known.update(message.id for message in fresh)
            lane.messages = deque(sorted([*lane.messages, *fresh], key=lambda message: message.id))
        wakers, lane.ready = lane.ready, []
        for ready in wakers:
            ready()

    def _lane_done(self, endpoint: str, conversation: str, lane: _Lane, task: asyncio.Task[None]) -> None:
        """A lane's task ended (also when it was cancelled before it started)."""
        lane.task = None
        lane.sending = False
        self._running -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery lane %s/%s failed", endpoint, conversation, exc_info=task.exception())
        elif lane.messages or lane.reload:
            self._run_lane(endpoint, conversation, lane)  # submitted or woken after its loop ended
        elif self._lanes.get((endpoint, conversation)) is lane:
            del self._lanes[(endpoint, conversation)]
        if self._running == 0:
            self._idle.set()

    async def _deliver(self, lane: _Lane, message: OutboundMessage) -> bool:
        """One attempt at the head of ``lane``; it stays at the head until its outcome is final.
        False when nobody could receive it (``DeliveryDeferred``)."""
        lane.sending = False
        wait_s = message.next_attempt_at - self._clock()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        adapter = self._adapters.get(message.endpoint)
        try:
            if adapter is None:
                raise DeliveryError(f"endpoint {message.endpoint} is not configured", retryable=False)
            if not self._limiter.try_acquire(message.endpoint, message.conversation):
                throttled_s = await self._limiter.acquire(message.endpoint, message.conversation)
                if throttled_s > 0:
                    self._metrics.inc("gateway_outbox_throttled_seconds_total", throttled_s, endpoint=message.endpoint)
            if self._closing:
                return True  # stays pending in the store for the next start
            lane.sending = True
            started = time.perf_counter()
            try:
                await adapter.send(message, functools.partial(self._outcomes.part_sent, message))
            finally:
                self._metrics.observe("gateway_send_seconds", time.perf_counter() - started, message.endpoint)
        except DeliveryDeferred as exc:
            self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome="deferred")
            if exc.keep is not None:
                await self._outcomes.drop_beyond(message.endpoint, message.conversation, exc.keep)
            return False
        except DeliverySkipped as exc:
            notice = f"skipped: {exc.reason}"
            if exc.refused_by_platform:  # a dead letter too, which operators can see and retry
                message.attempts += 1
                await self._outcomes.finish(message, OutboxState.DEAD, notice, exc.reason)
            else:
                await self._outcomes.finish(message, OutboxState.SKIPPED, notice, exc.reason)
        except DeliveryError as exc:
            if not await self._outcomes.failed(message, exc):
                return True  # a retry is scheduled: it stays at the head
        except Exception as exc:  # an adapter bug must not kill the lane: retry, then dead letter
            log.exception("adapter %s raised unexpectedly", message.endpoint)
            if not await self._outcomes.failed(message, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True)):
                return True
        else:
            message.sent_at = self._clock()
            await self._outcomes.finish(message, OutboxState.SENT, "sent", None)
        lane.messages.popleft()  # the outcome is final and stored
        self._known.discard(message.id)
        return True
