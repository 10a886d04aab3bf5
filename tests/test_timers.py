"""The session timers (gateway/sessions/timers.py) on a real event loop: one heap entry per
armed session, one loop timer for all; stale entries (disarmed, re-armed earlier) never fire."""

from __future__ import annotations

import asyncio
import time

from gateway.models import Session
from gateway.sessions import timers as timers_module
from gateway.sessions.state import Conversation, ManagerStats
from gateway.sessions.timers import SessionTimers


def _slot(n: int, expires_in_s: float) -> Conversation:
    slot = Conversation("web", f"c{n}")
    now = time.time()
    slot.session = Session(
        id=f"s{n}", endpoint="web", channel="webchat", conversation=f"c{n}", started_at=now,
        last_activity_at=now, expires_at=now + expires_in_s,
    )  # fmt: skip
    return slot


class Fired:
    """The ``on_due`` side: which slots came due, and when (wall clock)."""

    def __init__(self, expected: int) -> None:
        self.slots: list[Conversation] = []
        self.at: list[float] = []
        self._expected = expected
        self.all = asyncio.Event()

    def __call__(self, slot: Conversation, session: Session) -> None:
        self.slots.append(slot)
        self.at.append(time.time())
        if len(self.slots) >= self._expected:
            self.all.set()


async def test_sessions_with_the_same_deadline_each_fire_once() -> None:
    fired = Fired(300)
    timers = SessionTimers(time.time, ManagerStats(), on_due=fired)
    slots = [_slot(n, 0.05) for n in range(300)]
    shared = time.time() + 0.05
    for slot in slots:
        assert slot.session is not None
        slot.session.expires_at = shared
    timers.arm_all(slots)
    await asyncio.wait_for(fired.all.wait(), 5)
    await asyncio.sleep(0.05)
    assert sorted(s.conversation for s in fired.slots) == sorted(s.conversation for s in slots)
    assert all(at >= shared for at in fired.at)
    assert all(slot.armed_at is None for slot in slots)
    assert timers.entries == 0


async def test_disarmed_and_rearmed_earlier_slots_fire_only_for_their_live_entry() -> None:
    fired = Fired(2)
    timers = SessionTimers(time.time, ManagerStats(), on_due=fired)
    closed, shortened, kept = _slot(1, 0.1), _slot(2, 0.4), _slot(3, 0.15)
    for slot in (closed, shortened, kept):
        timers.arm(slot)
    timers.disarm(closed)  # its session closed: its entry stays in the heap, stale
    assert shortened.session is not None
    shortened.session.expires_at = time.time() + 0.05  # a shorter setting: re-armed earlier
    timers.arm(shortened)
    assert timers.entries == 4  # nothing is removed before its time
    await asyncio.wait_for(fired.all.wait(), 5)
    assert fired.slots == [shortened, kept]
    await asyncio.sleep(0.4)  # past the stale entries' times: nothing more fires
    assert fired.slots == [shortened, kept]
    assert timers.entries == 0


async def test_a_deadline_moved_later_rearms_when_its_entry_comes_due() -> None:
    fired = Fired(1)
    stats = ManagerStats()
    timers = SessionTimers(time.time, stats, on_due=fired)
    slot = _slot(1, 0.05)
    timers.arm(slot)
    assert slot.session is not None and slot.session.expires_at is not None
    slot.session.expires_at += 0.15  # a message moved it: no new entry...
    timers.arm(slot)
    assert timers.entries == 1
    await asyncio.wait_for(fired.all.wait(), 5)
    assert stats.timer_rearms == 1  # ...the old one came due early and re-armed
    assert fired.at[0] >= slot.session.expires_at


async def test_a_burst_larger_than_one_round_fires_completely_and_yields() -> None:
    count = 3 * timers_module.RUN_PER_CALLBACK + 7
    fired = Fired(count)
    timers = SessionTimers(time.time, ManagerStats(), on_due=fired)
    slots = [_slot(n, 0.05) for n in range(count)]
    due = time.time() + 0.05
    for slot in slots:
        assert slot.session is not None
        slot.session.expires_at = due  # all due at once
    timers.arm_all(slots)
    rounds_seen: list[int] = []

    async def heartbeat() -> None:  # runs between rounds when the burst yields to the loop
        while not fired.all.is_set():
            rounds_seen.append(len(fired.slots))
            await asyncio.sleep(0)

    beat = asyncio.create_task(heartbeat())
    await asyncio.wait_for(fired.all.wait(), 10)
    await beat
    assert len(fired.slots) == count and len(set(map(id, fired.slots))) == count
    seen = sorted({n for n in rounds_seen if n > 0} | {count})
    assert len(seen) >= 4, "the burst never yielded to the loop"
    assert max(b - a for a, b in zip([0, *seen], seen, strict=False)) <= timers_module.RUN_PER_CALLBACK


async def test_stopped_timers_fire_nothing() -> None:
    fired = Fired(1)
    timers = SessionTimers(time.time, ManagerStats(), on_due=fired)
    timers.arm(_slot(1, 0.02))
    timers.stop()
    await asyncio.sleep(0.1)
    assert fired.slots == []


async def test_only_the_near_future_is_in_the_heap_and_far_buckets_move_in_chunks() -> None:
    """Entries due later than about half a second wait in buckets outside the heap; a bucket
    bigger than one callback's share moves in over several loop iterations, drops its stale
    entries on the way, and every live entry still fires once."""
    count = 2 * timers_module.PROMOTE_PER_CALLBACK + 11
    fired = Fired(count)
    timers = SessionTimers(time.time, ManagerStats(), on_due=fired)
    far = [_slot(n, 30.0) for n in range(50)]
    timers.arm_all(far)
    due = time.time() + 1.2
    soon = [_slot(1000 + n, 1.2) for n in range(count + 100)]
    for slot in soon:
        assert slot.session is not None
        slot.session.expires_at = due  # one quarter-second bucket
    timers.arm_all(soon)
    for slot in soon[count:]:
        timers.disarm(slot)  # closed meanwhile: stale entries
    assert timers.heap_entries == 0 and timers.entries == count + 150
    moved: list[int] = []

    async def watch() -> None:
        while not fired.all.is_set():
            moved.append(timers.heap_entries)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(fired.all.wait(), 5)
    await watcher
    assert sorted(map(id, fired.slots)) == sorted(map(id, soon[:count]))
    assert all(at >= due for at in fired.at)
    steps = sorted(set(moved))
    assert max(b - a for a, b in zip([0, *steps], steps, strict=False)) <= timers_module.PROMOTE_PER_CALLBACK
    assert max(moved) == count  # the stale ones never reached the heap
    assert timers.entries == len(far) and timers.heap_entries == 0  # the far ones still wait
    timers.stop()


class SteppedClock:
    def __init__(self) -> None:
        self.step_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.step_s


async def test_a_step_back_undone_within_a_second_still_fires_on_the_wall_clock() -> None:
    """The wall clock steps back an hour and is corrected before anyone re-arms (ClockWatch
    checks once a second and can miss it): the timer, which woke early meanwhile and found its
    entry an hour away, never sleeps longer than MAX_SLEEP_S, so it fires soon after the fix."""
    clock = SteppedClock()
    stats = ManagerStats()
    fired = Fired(1)
    timers = SessionTimers(clock, stats, on_due=fired)
    slot = _slot(1, 0.3)
    timers.arm(slot)
    clock.step_s = -3600.0

    async def rearmed() -> None:  # woke at its loop time, found its entry an hour ahead
        while stats.timer_rearms == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(rearmed(), 5)
    assert fired.slots == []
    clock.step_s = 0.0
    corrected_at = time.monotonic()
    await asyncio.wait_for(fired.all.wait(), 5)
    assert time.monotonic() - corrected_at <= timers_module.MAX_SLEEP_S + 0.5
    timers.stop()
