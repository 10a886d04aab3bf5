"""Log lines for errors that can repeat per connection or per frame (rejected signatures,
accept failures, dropped frames): at most one line per second per kind, with a count of the
ones left out, so a flood of bad requests cannot flood the log (DESIGN.md "Hostile input").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EVERY_S = 1.0
MAX_KINDS = 1024  # kinds remembered; past it the oldest are forgotten (a kind names a cause)


@dataclass(slots=True)
class _Kind:
    last_at: float
    left_out: int = 0
    level: int = logging.WARNING
    flush: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """``log(level, kind, msg, *args)``: the first line of a kind goes out at once; more of the
    same kind within ``every_s`` are counted, and the count goes out with the next line of that
    kind, or on its own once ``every_s`` has passed (when an event loop runs)."""

    def __init__(
        self, logger: logging.Logger, *, every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._logger = logger
        self._every_s = every_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: object, exc_info: Any = None) -> None:
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now - state.last_at < self._every_s:
            state.left_out += 1
            state.level = level
            if state.flush is None:
                state.flush = _call_later(state.last_at + self._every_s - now, self._flush, kind)
            return
        if state is None:
            if len(self._kinds) >= MAX_KINDS:
                self._forget_oldest()
            state = self._kinds[kind] = _Kind(last_at=now)
        left_out = state.left_out
        self._reset(state, now)
        if left_out:
            self._logger.log(
                level, msg + " (and %d more like it in the last second)", *args, left_out, exc_info=exc_info
            )
        else:
            self._logger.log(level, msg, *args, exc_info=exc_info)

    def _flush(self, kind: str) -> None:
        state = self._kinds.get(kind)
        if state is None:
            return
        state.flush = None
        if state.left_out:
            self._logger.log(state.level, "%d more like it in the last second: %s", state.left_out, kind)
            self._reset(state, self._clock())

    @staticmethod
    def _reset(state: _Kind, now: float) -> None:
        state.last_at = now
        state.left_out = 0
        if state.flush is not None:
            state.flush.cancel()
            state.flush = None

    def _forget_oldest(self) -> None:
        kind, state = next(iter(self._kinds.items()))
        if state.flush is not None:
            state.flush.cancel()
        del self._kinds[kind]


def _call_later(delay_s: float, callback: Callable[[str], None], kind: str) -> asyncio.TimerHandle | None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # no loop: the count goes out with the next line of the kind
    return loop.call_later(max(delay_s, 0.0), callback, kind)
