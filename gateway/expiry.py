"""Inactivity timers: one ``loop.call_at`` handle per open session, re-armed lazily.

DESIGN.md "Known traps": a cancelled ``TimerHandle`` stays in asyncio's heap, and when more than
half of it is cancelled the loop rebuilds it in one go (a long stall with a million sessions).
So a message only moves ``session.expires_at``; when the handle fires early it re-arms itself
for the remainder; a handle is cancelled only on close or when the deadline moves earlier.

A handle that finds its session due hands it over: to the conversation's own queue when the
conversation is busy (``on_busy``), else to a batch closer that closes many sessions falling due
together in a few store commits, several batches in flight so that group commit overlaps them.
Deadlines are wall-clock (``clock``); loop time exists only here, in memory.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.models import Session
from gateway.session_types import Conversation, ManagerStats, SlotState

# A handle that fires this much before the deadline re-arms instead of closing: loop time and
# wall time drift apart by a little, and closing early is worse than a millisecond late.
EARLY_TOLERANCE_S = 0.0005
CLOSE_BATCH = 500  # sessions closed per batch (group commit merges batches in flight)
CLOSE_BATCHES_IN_FLIGHT = 4


class ExpiryTimers:
    """Arms the timers of open sessions and hands due ones over for closing."""

    def __init__(
        self,
        clock: Callable[[], float],
        stats: ManagerStats,
        *,
        close_batch: Callable[[list[Conversation]], Coroutine[Any, Any, None]],
        on_busy: Callable[[Conversation, Session], None],
    ) -> None:
        self._clock = clock
        self._stats = stats
        self._close_batch = close_batch
        self._on_busy = on_busy
        self._due: list[Conversation] = []
        self._due_signal = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self._stopped = False
        # Shared by every handle: a bound method and a context per handle would cost ~100 bytes
        # per open session for nothing (timers read no context variables).
        self._fire = self._on_timer
        self._context = contextvars.Context()

    def start(self) -> None:
        self._closer = asyncio.create_task(self._run_closer(), name="session-closer")

    async def aclose(self) -> None:
        """Stop firing; cancel the closer (its batches in flight are cancelled too)."""
        self._stopped = True
        if self._closer is not None:
            self._closer.cancel()
            await asyncio.gather(self._closer, return_exceptions=True)

    @property
    def idle(self) -> bool:
        """No due session waits for the batch closer."""
        return not self._due

    def is_due(self, session: Session) -> bool:
        return session.expires_at is not None and session.expires_at - self._clock() <= EARLY_TOLERANCE_S

    def arm(self, slot: Conversation) -> None:
        """Make sure the slot's handle fires no later than its session's deadline."""
        session = slot.session
        if session is None or session.expires_at is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + (session.expires_at - self._clock())
        if slot.handle is not None:
            if slot.handle.when() <= when:
                return  # fires early and re-arms itself: no cancel, no heap churn
            slot.handle.cancel()  # the deadline moved earlier (a shorter setting)
        slot.handle = loop.call_at(when, self._fire, slot, context=self._context)

    def disarm(self, slot: Conversation) -> None:
        if slot.handle is not None:
            slot.handle.cancel()
            slot.handle = None

    def _on_timer(self, slot: Conversation) -> None:
        slot.handle = None
        session = slot.session
        if session is None or self._stopped:
            return
        self._stats.timer_fires += 1
        if not self.is_due(session):
            self._stats.timer_rearms += 1
            self.arm(slot)
            return
        if self._stats.record_lags and session.expires_at is not None:
            self._stats.fire_lags_s.append(self._clock() - session.expires_at)
        if slot.state == SlotState.IDLE:
            # Closed in a batch with others falling due now: one commit for many closes.
            slot.state = SlotState.CLOSING
            self._due.append(slot)
            self._due_signal.set()
        else:
            self._on_busy(slot, session)

    async def _run_closer(self) -> None:
        in_flight = asyncio.Semaphore(CLOSE_BATCHES_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._due_signal.wait()
                self._due_signal.clear()
                while self._due:
                    await in_flight.acquire()
                    batch, self._due = self._due[:CLOSE_BATCH], self._due[CLOSE_BATCH:]
                    task = asyncio.create_task(self._close_batch(batch))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _done: in_flight.release())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
