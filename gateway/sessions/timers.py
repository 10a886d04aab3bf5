"""Inactivity timers: one entry per open session in our own structures, one loop timer for them all.

Each open session's deadline is an entry ``(deadline, slot)`` in a heap ordered by deadline
(wall clock, the very float of ``session.expires_at`` when it was armed: no float of its own); a
single ``loop.call_at`` handle waits for the earliest entry (converted to loop time when it is
scheduled) and, when it fires, runs every entry that is due. Measured against one
``TimerHandle`` per session (bench/sessions.py): an entry is a 2-tuple (56 B) where a handle with
its args tuple and loop-time float took 184 B, and arming it is a C ``heappush`` where
``call_at`` built a handle in Python, which was most of what restoring a million sessions cost.

Only the near future is a heap: entries due within about half a second. Later ones wait
unordered in buckets of a quarter second (``_far``, keyed by bucket number, with a heap of the
keys), and a bucket moves into the near heap, in chunks, a quarter second before it starts.
Popping the earliest of a million entries touched ~20 random cache lines (3.9 us a pop on this
machine, against 1.7 us at 100,000 and 0.5 us at 10,000): in a mass expiry, popping was the
biggest single cost of a close on the event loop. Stale entries are dropped when their bucket
moves, so they never reach the heap. A bucket costs a list per quarter second that has
deadlines in it: nothing next to a million sessions unless each has a deadline of its own
quarter second (expirations of months, spread evenly).

DESIGN.md "Known traps": a cancelled entry must not cost a rebuild of a big heap. So nothing is
ever removed before its time: ``slot.armed_at`` holds the deadline of the slot's
one live entry, and an entry popped with another ``when`` (the slot was disarmed, or re-armed
earlier) is dropped. A message only moves ``session.expires_at``; when the entry comes due
early it re-arms itself for the remainder; a new entry is pushed only when the deadline moves
earlier (a shorter setting) or a session opens.

An entry that finds its session due hands it to ``on_due`` (the scheduler, which closes it in a
batch or in the conversation's own queue). Timers call nothing else: data flows one way.
Deadlines are wall-clock (``clock``); loop time exists only here, in memory, for the one
wake-up, computed when it is scheduled. After a wall clock stepped back the wake-up comes early,
finds nothing due and re-arms; after a step forward its loop time is too late, so ``rewake`` (the
manager's ``rearm_all``, on ClockWatch's notice) moves it earlier, to the earliest deadline. And
the wake-up never sleeps longer than ``MAX_SLEEP_S``, so a step that ClockWatch missed is seen
within a second too.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import math
from collections.abc import Callable, Iterable

from gateway.metrics import Metrics
from gateway.models import Session
from gateway.sessions.state import Conversation, ManagerStats

# An entry that comes due this much before the deadline re-arms instead of closing: loop time
# and wall time drift apart by a little, and closing early is worse than a millisecond late.
EARLY_TOLERANCE_S = 0.0005
# Entries run per loop callback: a burst of due sessions yields to the loop in between.
RUN_PER_CALLBACK = 2000
# Far entries wait in buckets of 1/BUCKETS_PER_S s (a power of two: bucket bounds are exact
# floats); a bucket moves into the near heap PROMOTE_AHEAD_S before it starts, at most
# PROMOTE_PER_CALLBACK entries per loop callback.
BUCKETS_PER_S = 4
PROMOTE_AHEAD_S = 0.25
PROMOTE_PER_CALLBACK = 2000
# The loop timer never sleeps longer than this: a wake-up computed before a wall-clock step
# looks again within a second, however briefly the clock was off (ClockWatch, which checks once
# a second, can miss a step back that is undone before its next check).
MAX_SLEEP_S = 1.0


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
        self._near: list[tuple[float, Conversation]] = []  # heap of (wall-clock deadline, slot)
        self._far: dict[int, list[tuple[float, Conversation]]] = {}  # bucket number -> entries
        self._far_keys: list[int] = []  # heap of the bucket numbers in ``_far``
        self._moving: list[tuple[float, Conversation]] = []  # what is left of the bucket moving now
        self._horizon = -math.inf  # entries due before it are in ``_near`` or ``_moving``
        self._wakeup: asyncio.TimerHandle | None = None  # the loop timer, for deadline ``_wakeup_at``
        self._wakeup_at = math.inf
        self._wakeup_capped = False  # the wake-up comes before ``_wakeup_at`` (MAX_SLEEP_S)
        self._context = contextvars.Context()  # timers read no context variables

    def stop(self) -> None:
        """Fire nothing from now on."""
        self._stopped = True
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None

    @property
    def entries(self) -> int:
        """Entries, live and stale (for tests and benchmarks)."""
        return len(self._near) + len(self._moving) + sum(len(bucket) for bucket in self._far.values())

    @property
    def heap_entries(self) -> int:
        """Entries in the near heap (for tests and benchmarks)."""
        return len(self._near)

    def is_due(self, session: Session, due_by: float | None = None) -> bool:
        """The session's deadline has come (``due_by``, from ``due_by()``: one clock read for
        checking many sessions)."""
        expires_at = session.expires_at
        return expires_at is not None and expires_at <= (self.due_by() if due_by is None else due_by)

    def due_by(self) -> float:
        """Sessions whose deadline is at or before this (wall clock) are due now."""
        return self._clock() + EARLY_TOLERANCE_S

    def arm(self, slot: Conversation) -> None:
        """Make sure the slot's entry comes due no later than its session's deadline."""
        session = slot.session
        if session is not None and session.expires_at is not None:
            self._push(slot, session.expires_at)

    def arm_all(self, slots: Iterable[Conversation]) -> None:
        """``arm`` each slot (restore)."""
        for slot in slots:
            session = slot.session
            if session is not None and session.expires_at is not None:
                self._push(slot, session.expires_at)

    def rewake(self) -> None:
        """Move the loop wake-up earlier if the earliest entry's wall-clock deadline now comes
        sooner than it (the wall clock stepped forward: the loop time it was computed for is
        late by the step). A wake-up that is early instead (a step back) is kept: it finds its
        entry not due and re-arms, as a handle would. The entries stay: their keys are wall-clock."""
        if self._stopped:
            return
        target = self._next_target()
        if target == math.inf:
            return
        when = asyncio.get_running_loop().time() + max(0.0, target - self._clock())
        if self._wakeup is not None and self._wakeup.when() <= when:
            return
        self._wake_for(target)

    def disarm(self, slot: Conversation) -> None:
        slot.armed_at = None  # its entry, if any, is dropped when it comes due

    def _push(self, slot: Conversation, deadline: float) -> None:
        armed = slot.armed_at
        if armed is not None and armed <= deadline:
            return  # comes due early and re-arms itself: no new entry
        if deadline < self._horizon:
            slot.armed_at = deadline
            heapq.heappush(self._near, (deadline, slot))
            wake = deadline
        else:
            if not deadline < math.inf:
                return  # never due (infinite, or NaN)
            key = int(deadline * BUCKETS_PER_S)  # exact: a power of two
            slot.armed_at = deadline
            bucket = self._far.get(key)
            if bucket is None:
                bucket = self._far[key] = []
                heapq.heappush(self._far_keys, key)
            bucket.append((deadline, slot))
            wake = key / BUCKETS_PER_S - PROMOTE_AHEAD_S
        if wake < self._wakeup_at and not self._stopped:
            self._wake_for(wake)

    def _next_target(self) -> float:
        """The wall-clock time the loop must wake at next: the earliest near entry, or when the
        next bucket is to move (now, while one is moving)."""
        target = self._near[0][0] if self._near else math.inf
        if self._moving:
            return min(target, self._horizon - 1 / BUCKETS_PER_S - PROMOTE_AHEAD_S)
        if self._far_keys:
            return min(target, self._far_keys[0] / BUCKETS_PER_S - PROMOTE_AHEAD_S)
        return target

    def _wake_for(self, deadline: float) -> None:
        if self._wakeup is not None:
            self._wakeup.cancel()
        loop = asyncio.get_running_loop()
        delay = deadline - self._clock()
        self._wakeup_capped = delay > MAX_SLEEP_S
        when = loop.time() + max(0.0, min(delay, MAX_SLEEP_S))
        self._wakeup = loop.call_at(when, self._run_due, context=self._context)
        self._wakeup_at = deadline

    def _promote(self, until: float) -> None:
        """Move entries of buckets starting before ``until`` into the near heap, at most
        ``PROMOTE_PER_CALLBACK``; stale ones are dropped on the way."""
        near, budget = self._near, PROMOTE_PER_CALLBACK
        while budget > 0:
            if not self._moving:
                if not self._far_keys or self._far_keys[0] / BUCKETS_PER_S > until:
                    return
                key = heapq.heappop(self._far_keys)
                self._moving = self._far.pop(key)
                self._horizon = (key + 1) / BUCKETS_PER_S
            moving = self._moving
            take = min(budget, len(moving))
            budget -= take
            for _ in range(take):
                entry = moving.pop()
                if entry[1].armed_at is entry[0]:
                    heapq.heappush(near, entry)

    def _run_due(self) -> None:
        target = self._wakeup_at
        self._wakeup = None
        self._wakeup_at = math.inf
        if self._stopped:
            return
        now = self._clock()
        due_by = now + EARLY_TOLERANCE_S
        if target > due_by and not self._wakeup_capped:
            self._stats.timer_rearms += 1  # woke before its wall-clock deadline (a step back): re-arms below
        self._promote(now + PROMOTE_AHEAD_S)
        heap = self._near
        ran = 0
        lags: dict[str, list[float]] = {}  # fire lags by endpoint, into the metrics once per round
        while heap and heap[0][0] <= due_by and ran < RUN_PER_CALLBACK:
            deadline, slot = heapq.heappop(heap)
            if slot.armed_at is not deadline:
                continue  # stale: disarmed, or re-armed earlier since
            slot.armed_at = None
            ran += 1
            self._fire(slot, lags)
        if self._metrics is not None:
            for endpoint, values in lags.items():
                self._metrics.observe_many("gateway_timer_fire_lag_seconds", values, endpoint)
        if not self._stopped:
            target = self._next_target()
            if target < self._wakeup_at:
                self._wake_for(target)  # due already after a full round: runs next iteration

    def _fire(self, slot: Conversation, lags: dict[str, list[float]]) -> None:
        session = slot.session
        if session is None:
            return
        self._stats.timer_fires += 1
        expires_at = session.expires_at
        lag_s = self._clock() - expires_at if expires_at is not None else -math.inf
        if lag_s < -EARLY_TOLERANCE_S:  # not due (``is_due``): a message moved the deadline
            self._stats.timer_rearms += 1
            self.arm(slot)
            return
        lags.setdefault(slot.endpoint, []).append(max(0.0, lag_s))
        if self._stats.record_lags:
            self._stats.fire_lags_s.append(lag_s)
        self._on_due(slot, session)
