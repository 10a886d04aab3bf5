"""Wall-clock steps: deadlines are wall-clock times, timers run on the loop's monotonic clock.

When the wall clock steps (NTP correcting a wrong clock, an operator's ``date -s``), a timer
armed before the step fires at the wrong wall time: after a step forward, sessions already
overdue would wait out their old loop time; after a step back and a later correction, they
would sleep an hour too long. ``ClockWatch`` compares wall and loop time every
``CHECK_EVERY_S`` and calls ``on_step`` when they moved apart by more than ``STEP_S``; the
manager then re-arms every timer, so no session closes more than a few seconds from its
wall-clock deadline (DESIGN.md "Hostile input": checked at least every 5 s, steps over 1 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.sessions")

CHECK_EVERY_S = 1.0
STEP_S = 1.0


class ClockWatch:
    """A task that notices steps of ``clock`` (wall) against the loop's clock."""

    def __init__(
        self,
        clock: Callable[[], float],
        on_step: Callable[[float], Awaitable[None]],
        *,
        every_s: float = CHECK_EVERY_S,
        step_s: float = STEP_S,
    ) -> None:
        self._clock = clock
        self._on_step = on_step
        self._every_s = every_s
        self._step_s = step_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="clock-watch")

    async def aclose(self) -> None:
        """Stop watching. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        offset = self._clock() - loop.time()
        while True:
            await asyncio.sleep(self._every_s)
            current = self._clock() - loop.time()
            step, offset = current - offset, current
            if abs(step) > self._step_s:
                log.warning("the wall clock stepped %+.1f s; re-arming every session timer", step)
                try:
                    await self._on_step(step)
                except Exception:
                    log.exception("re-arming the timers after a clock step failed")
