"""Durable delivery of replies and closure notices.

Messages reach the outbox only after the store committed them (with the state change that
produced them). Each conversation is a lane: strictly FIFO, one send at a time, so replies and
notices leave in the order produced; different conversations send in parallel, each lane in its
own task, so one lane waiting (for a retry, a rate-limit token, a slow platform) holds up only
itself. A message is marked sent only after the platform's 2xx, and that bookkeeping is shielded
from cancellation and repeated until the store takes it: a message is never sent again because
its "sent" mark failed to commit. Before each send a lane waits for its rate-limit tokens
(``gateway.ratelimit``: per endpoint, per conversation).

Retry is data (attempts and ``next_attempt_at`` persist on the row), so a restart resumes the
schedule. Outcomes:

- ``SENT``: the platform accepted it.
- ``SKIPPED``: policy forbade the send before it was made (Messenger's 24 h window checked
  locally, empty text). Not a failure; closure notice ``skipped: <reason>``.
- ``DEAD`` (a dead letter, listed at ``GET /admin/dead-letters`` and retried through
  ``Outbox.retry``): a permanent refusal (``DeliveryError(retryable=False)``), retries exhausted
  (``delivery.max_attempts``), or older than ``delivery.max_age_minutes``. A platform that
  received the send and refused it for policy (Twilio 21610: the recipient opted out; Messenger's
  own "outside of allowed window" answer) is a dead letter too, although the adapter reports it
  as ``DeliverySkipped``: the operator must see it, while the closure notice still reads
  ``skipped: <reason>``. Other dead closure notices read ``failed: <reason>``.

A long text goes out in parts (one platform request each, ``ChannelAdapter.send``). After each
part the platform accepted, and before the next goes out, the lane commits ``parts_sent`` on the
row (a narrow write, shielded and repeated like the "sent" mark); retries and restarts resume
after it. The last part needs no such write: the "sent" mark follows it. A dead letter retried
keeps its ``parts_sent``: what the platform accepted is not sent again.

The one window in which a send can repeat (platforms without an idempotency key): a crash
after the platform accepted a part and before its record (``parts_sent``, or the "sent" mark
for the last part) committed; on restart that part is still unrecorded and goes out again, the
parts before it do not. LINE pushes carry ``X-Line-Retry-Key`` instead.

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
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from channels.base import ChannelAdapter
from gateway.errors import DeliveryDeferred, DeliveryError, DeliverySkipped, MessageNotDead, MessageNotFound
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import Change, MessageKind, OutboundMessage, OutboxState
from gateway.ratelimit import RateLimiter
from gateway.sessions import OutboxSink
from gateway.settings import DeliverySettings
from gateway.store.base import Store

log = logging.getLogger("gateway.outbox")

# DeliverySkipped reasons that carry a platform's answer to a send it received, as the adapters
# word them: Twilio's error 21610, and a Messenger Send API error (the local window check says
# only "outside the 24 h messaging window").
CLOSE_GRACE_S = 2.0  # how long aclose lets sends in flight finish
# A failed bookkeeping write is tried again after this long, doubling up to the maximum.
_RECORD_RETRY_S = 0.1
_RECORD_RETRY_MAX_S = 5.0


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; after ``max_attempts`` or ``max_age_s`` a dead letter."""

    max_attempts: int = 8
    max_age_s: float = 24 * 3600.0
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0

    @classmethod
    def from_settings(cls, delivery: DeliverySettings) -> RetryPolicy:
        return cls(
            max_attempts=delivery.max_attempts,
            max_age_s=delivery.max_age_minutes * 60.0,
            base_delay_s=delivery.base_delay_seconds,
            max_delay_s=delivery.max_delay_seconds,
        )

    def delay_s(self, attempts: int, retry_after_s: float | None) -> float:
        """The wait before attempt ``attempts + 1``; never shorter than the platform asked."""
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempts - 1))
        backoff *= 0.5 + random.random() / 2  # jitter: lanes that failed together retry apart
        return float(max(backoff, retry_after_s or 0.0))


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
        self._retry = retry or RetryPolicy()
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
                await adapter.send(message, functools.partial(self._part_sent, message))
            finally:
                self._metrics.observe("gateway_send_seconds", time.perf_counter() - started, message.endpoint)
        except DeliveryDeferred as exc:
            self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome="deferred")
            if exc.keep is not None:
                await self._drop_beyond(message.endpoint, message.conversation, exc.keep)
            return False
        except DeliverySkipped as exc:
            notice = f"skipped: {exc.reason}"
            if exc.refused_by_platform:  # a dead letter too, which operators can see and retry
                message.attempts += 1
                await self._finish(lane, message, OutboxState.DEAD, notice, exc.reason)
            else:
                await self._finish(lane, message, OutboxState.SKIPPED, notice, exc.reason)
        except DeliveryError as exc:
            await self._failed(lane, message, exc)
        except Exception as exc:  # an adapter bug must not kill the lane: retry, then dead letter
            log.exception("adapter %s raised unexpectedly", message.endpoint)
            await self._failed(lane, message, DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True))
        else:
            message.sent_at = self._clock()
            await self._finish(lane, message, OutboxState.SENT, "sent", None)
        return True

    async def _drop_beyond(self, endpoint: str, conversation: str, keep: int) -> None:
        """Keep at most ``keep`` pending messages of a conversation nobody receives now: the
        older ones are dropped (``skipped``; a dropped closure notice reads ``skipped: ...``)."""
        try:
            kept = await self._store.pending_outbox_of(endpoint, conversation)
            if len(kept) <= keep:
                return
            reason = f"dropped: more than {keep} messages kept for a conversation nobody reads"
            dropped = kept[: len(kept) - keep]
            change = Change(outbox_updates=dropped)
            for message in dropped:
                message.state = OutboxState.SKIPPED
                message.last_error = reason
                if message.kind is MessageKind.CLOSURE and message.session_id:
                    change.notices.append((message.session_id, f"skipped: {reason}"))
            await self._store.commit(change)
        except Exception:  # the cap is tried again at the next deferral
            log.exception("cannot drop the oldest kept messages of %s/%s", endpoint, conversation)
            return
        self._metrics.inc("gateway_messages_out_total", len(dropped), endpoint=endpoint, outcome="dropped")
        log.info("dropped %d kept messages: endpoint=%s conversation=%s", len(dropped), endpoint, conversation)

    async def _failed(self, lane: _Lane, message: OutboundMessage, exc: DeliveryError) -> None:
        message.attempts += 1
        now = self._clock()
        if not exc.retryable:
            await self._finish(lane, message, OutboxState.DEAD, f"failed: {exc.reason}", exc.reason)
            return
        next_attempt_at = now + self._retry.delay_s(message.attempts, exc.retry_after_s)
        deadline = message.created_at + self._retry.max_age_s
        if message.attempts >= self._retry.max_attempts:
            reason = f"{exc.reason} (gave up after {message.attempts} attempts)"
        elif next_attempt_at > deadline:
            reason = f"{exc.reason} (gave up: older than {self._retry.max_age_s / 60:g} minutes)"
        else:
            message.next_attempt_at = next_attempt_at
            message.last_error = exc.reason
            self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome="retry")
            log.warning(
                "send failed (attempt %d), retrying in %.2f s: endpoint=%s conversation=%s: %s",
                message.attempts,
                next_attempt_at - now,
                message.endpoint,
                message.conversation,
                exc.reason,
                extra=log_context(message.endpoint, message.conversation, message.session_id),
            )
            await self._record(functools.partial(self._store.commit, Change(outbox_updates=[message])))
            return
        await self._finish(lane, message, OutboxState.DEAD, f"failed: {reason}", reason)

    async def _part_sent(self, message: OutboundMessage, done: int, total: int) -> None:
        """The platform accepted parts 1..``done`` of ``total``: commit that before the next part
        goes out, so that no retry and no restart sends them again (the last part's record is
        the "sent" mark)."""
        message.parts_sent = done
        if done < total:
            await self._record(functools.partial(self._store.record_parts_sent, message.id, done))

    async def _finish(
        self, lane: _Lane, message: OutboundMessage, state: OutboxState, notice: str, error: str | None
    ) -> None:
        message.state = state
        message.last_error = error
        change = Change(outbox_updates=[message])
        if message.kind is MessageKind.CLOSURE and message.session_id:
            change.notices.append((message.session_id, notice))
        await self._record(functools.partial(self._store.commit, change))
        lane.messages.popleft()
        self._known.discard(message.id)
        self._metrics.inc("gateway_messages_out_total", endpoint=message.endpoint, outcome=state.value)
        # Per-message lines are DEBUG (DESIGN.md, logging); a dead letter is an operator's business.
        level = logging.WARNING if state is OutboxState.DEAD else logging.DEBUG
        if not log.isEnabledFor(level):  # log_context costs a dict per call
            return
        log.log(
            level,
            "message out %s: endpoint=%s conversation=%s kind=%s id=%d%s",
            state.value,
            message.endpoint,
            message.conversation,
            message.kind.value,
            message.id,
            f" ({error})" if error else "",
            extra=log_context(message.endpoint, message.conversation, message.session_id),
        )

    async def _record(self, write: Callable[[], Awaitable[None]]) -> None:
        """Commit a delivery outcome or progress (``write()``, a store write), shielded, until
        the store takes it.

        Giving up would leave the message pending at the head of its lane, and the lane would
        send it (or the part) again: after a 2xx that is the duplicate this module promises not
        to make.
        """
        delay_s = _RECORD_RETRY_S
        while True:
            try:
                # A shutdown must not lose the record of a message the platform accepted. A
                # store that queued the write already hands back a future (SqliteStore): it is
                # applied even if this task is cancelled, and a shield would cost a task per send.
                pending = write()
                await (pending if isinstance(pending, asyncio.Future) else asyncio.shield(pending))
                return
            except Exception:
                log.exception("cannot record a delivery outcome; trying again in %.1f s", delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _RECORD_RETRY_MAX_S)
