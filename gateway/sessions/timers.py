"""Inactivity timers: one ``loop.call_at`` handle per open session, re-armed lazily.

DESIGN.md "Known traps": a cancelled ``TimerHandle`` stays in asyncio's heap, and when more than
half of it is cancelled the loop rebuilds it in one go (a long stall with a million sessions).
So a message only moves ``session.expires_at``; when the handle fires early it re-arms itself
for the remainder; a handle is cancelled only on close or when the deadline moves earlier.

A handle that finds its session due hands it to ``on_due`` (the scheduler, which closes it in a
batch or in the conversation's own queue). Timers call nothing else: data flows one way.
Deadlines are wall-clock (``clock``); loop time exists only here, in memory.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

from gateway.metrics import Metrics
from gateway.models import Session
from gateway.sessions.state import Conversation, ManagerStats

# A handle that fires this much before the deadline re-arms instead of closing: loop time and
# wall time drift apart by a little, and closing early is worse than a millisecond late.
EARLY_TOLERANCE_S = 0.0005


class SessionTimers:
    """Arms the timers of open sessions and hands due ones to ``on_due``."""

    def __init__(
        self,
        clock: Callable[[], float],
        stats: ManagerStats,
        *,
        on_due: Callable[[Conversation, Session], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._stats = stats
        self._on_due = on_due
        self._stopped = False
        # Shared by every handle: a bound method and a context per handle would cost ~100 bytes
        # per open session for nothing (timers read no context variables).
        self._fire = self._on_timer
        self._context = contextvars.Context()

    def stop(self) -> None:
        """Fire nothing from now on (handles still in the loop become no-ops)."""
        self._stopped = True

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
        if session.expires_at is not None:
            lag_s = self._clock() - session.expires_at
            if self._metrics is not None:
                self._metrics.observe("gateway_timer_fire_lag_seconds", max(0.0, lag_s), slot.endpoint)
            if self._stats.record_lags:
                self._stats.fire_lags_s.append(lag_s)
        self._on_due(slot, session)
