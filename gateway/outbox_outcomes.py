"""What became of each send, committed to the store: the outbox's bookkeeping.

The lanes (``gateway.outbox``) make one attempt at a time and hand its result here. A message is
marked sent only after the platform's 2xx, and every such record is shielded from cancellation
and repeated until the store takes it (``_record``): a message is never sent again because its
"sent" mark failed to commit.

Retry is data (attempts and ``next_attempt_at`` persist on the row), so a restart resumes the
schedule (``RetryPolicy``). Outcomes:

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
part the platform accepted, and before the next goes out, ``part_sent`` commits ``parts_sent``
on the row (a narrow write, shielded and repeated like the "sent" mark); retries and restarts
resume after it. The last part needs no such write: the "sent" mark follows it. A dead letter
retried keeps its ``parts_sent``: what the platform accepted is not sent again.

The one window in which a send can repeat (platforms without an idempotency key): a crash
after the platform accepted a part and before its record (``parts_sent``, or the "sent" mark
for the last part) committed; on restart that part is still unrecorded and goes out again, the
parts before it do not. LINE pushes carry ``X-Line-Retry-Key`` instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import DeliveryError
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import Change, MessageKind, OutboundMessage, OutboxState
from gateway.settings import DeliverySettings
from gateway.store.base import Store

log = logging.getLogger("gateway.outbox")  # the lanes' logger: delivery logs keep one name

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


class OutcomeRecorder:
    """Commits the outcome of each attempt (and the parts sent so far), counts and logs it.

    ``clock`` is wall-clock seconds (``next_attempt_at`` and ages persist).
    """

    def __init__(self, store: Store, metrics: Metrics, clock: Callable[[], float], retry: RetryPolicy) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._retry = retry

    async def drop_beyond(self, endpoint: str, conversation: str, keep: int) -> None:
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

    async def failed(self, message: OutboundMessage, exc: DeliveryError) -> bool:
        """Schedule the next attempt, or record a dead letter (permanent, too many attempts, too
        old). True when the outcome is final (the message leaves its lane)."""
        message.attempts += 1
        now = self._clock()
        if not exc.retryable:
            await self.finish(message, OutboxState.DEAD, f"failed: {exc.reason}", exc.reason)
            return True
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
            await _record(functools.partial(self._store.commit, Change(outbox_updates=[message])))
            return False
        await self.finish(message, OutboxState.DEAD, f"failed: {reason}", reason)
        return True

    async def part_sent(self, message: OutboundMessage, done: int, total: int) -> None:
        """The platform accepted parts 1..``done`` of ``total``: commit that before the next part
        goes out, so that no retry and no restart sends them again (the last part's record is
        the "sent" mark)."""
        message.parts_sent = done
        if done < total:
            await _record(functools.partial(self._store.record_parts_sent, message.id, done))

    async def finish(self, message: OutboundMessage, state: OutboxState, notice: str, error: str | None) -> None:
        """Record a final outcome (``notice`` for a closure notice's session)."""
        message.state = state
        message.last_error = error
        change = Change(outbox_updates=[message])
        if message.kind is MessageKind.CLOSURE and message.session_id:
            change.notices.append((message.session_id, notice))
        await _record(functools.partial(self._store.commit, change))
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


async def _record(write: Callable[[], Awaitable[None]]) -> None:
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
