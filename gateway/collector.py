"""Short garbage-collector pauses with a million open sessions in memory.

Each open session keeps three objects the cyclic collector tracks (its ``Session``, its
conversation slot, its timer entry). With CPython's defaults a full collection walks all of
them: about 0.37 s at a million sessions (bench/sessions.py's machine), a loop stall that
delays every timer and request. And CPython runs a full collection whenever the objects
promoted since the last one reach a quarter of the heap, which a busy gateway reaches all the
time: the sessions it opens, and its in-flight requests' objects that happen to live through
two young collections. Under bench/ingest.py's load that was 22 full collections in 10 s,
up to 60 ms each, and about a tenth of the loop's time went to the collector.

``CollectorPacer`` changes two things, process-wide (``chat-gateway serve`` installs it once
it has restored its sessions):

- the young generation is collected after 5,000 new objects instead of 700. Most of a
  request's objects are freed by reference counting before a collection sees them, so the
  collector does far less work, and each young pass stays within a few milliseconds;
- whatever survives a collection of the middle generation is frozen (``gc.freeze``): the
  survivors are long-lived, and the collector stops walking them. Frozen objects are still freed
  by reference counting as usual (a closed session leaves memory at once).

What a frozen object cannot be is collected as part of a garbage cycle: an object that was alive
when it was frozen and later dies in a cycle stays in memory (a closed connection's transport is
the common case: it holds a bound method of itself). So the pacer lets the collector walk the
whole heap once more (``gc.unfreeze``) when the process's peak memory has grown by half since
the last such pass, and at most once every ten minutes: whole-heap passes come only as the
process grows, not with every quarter of turnover as in CPython (sessions closing and opening
reuse the memory), and memory held by dead cycles stays bounded. Such a pass costs what any
full collection costs: ~0.4 s at a million open sessions, 232 ms at 225,000 (bench/ingest.py
run for 60 s), which found nothing to free there. Peak RSS is the measure because it
is one cheap system call; counting the frozen objects walks all of them (28 ms at 3 million).
Each whole-heap pass is logged with its duration.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("gateway.collector")

YOUNG_THRESHOLD = 5_000  # new tracked objects before a young collection (CPython: 700)
MIDDLE_THRESHOLD = 4  # young collections before a middle one (CPython: 10): <= 20,000 objects
OLD_THRESHOLD = 10  # CPython's; full collections find little unfrozen to walk here
REGROWTH = 0.5  # peak memory may grow by this before a whole-heap pass reclaims dead cycles
MIN_REGROWTH_BYTES = 32 * 1024 * 1024  # on a small process, whole-heap passes are cheap but need not be frequent
MIN_PASS_INTERVAL_S = 600.0  # whole-heap passes at most this often, however fast the process grows


def peak_rss_bytes() -> int:
    """The process's peak resident memory (one ``getrusage`` call)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


@dataclass(slots=True)
class CollectorStats:
    """What the pacer did (for the log, tests and benchmarks)."""

    freezes: int = 0
    whole_heap_passes: int = 0
    last_whole_heap_pass_s: float = 0.0
    last_unreachable: int = 0


class CollectorPacer:
    """Paces CPython's cyclic garbage collector for a heap of long-lived sessions (module
    docstring). ``install`` collects once, freezes what survives and sets the thresholds;
    ``uninstall`` puts CPython's thresholds back and unfreezes. One per process.

    Whole-heap passes are logged through ``loop`` (a collection may run on any thread, in the
    middle of anything, so nothing is logged from inside it); without a loop, not at all.
    ``memory`` measures the process's growth (peak RSS in bytes), ``clock`` the interval between
    whole-heap passes (seconds).
    """

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        young: int = YOUNG_THRESHOLD,
        middle: int = MIDDLE_THRESHOLD,
        old: int = OLD_THRESHOLD,
        regrowth: float = REGROWTH,
        min_regrowth_bytes: int = MIN_REGROWTH_BYTES,
        min_pass_interval_s: float = MIN_PASS_INTERVAL_S,
        memory: Callable[[], int] = peak_rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._thresholds = (young, middle, old)
        self._regrowth = regrowth
        self._min_regrowth = min_regrowth_bytes
        self._min_interval_s = min_pass_interval_s
        self._memory = memory
        self._clock = clock
        self._last_pass_at = 0.0
        self._saved_thresholds: tuple[int, int, int] | None = None
        self._reclaim_at = 0  # memory (bytes) past which the next pass walks the whole heap
        self._whole_heap = False  # the collection running now walks what was frozen
        self._started = 0.0
        self.stats = CollectorStats()

    def install(self) -> None:
        """Collect everything once, freeze the survivors, and pace the collector from now on."""
        if self._saved_thresholds is not None:
            return
        self._saved_thresholds = gc.get_threshold()
        self.stats.last_unreachable = gc.collect()
        gc.freeze()
        self._rearm()
        gc.set_threshold(*self._thresholds)
        gc.callbacks.append(self._on_collection)
        # Not gc.get_freeze_count(): it walks every frozen object (28 ms at 3 million), at start.
        log.info(
            "garbage collector paced: %d unreachable objects freed, the survivors frozen; "
            "young collections every %d new objects",
            self.stats.last_unreachable,
            self._thresholds[0],
        )

    def uninstall(self) -> None:
        """CPython's own pacing again; what was frozen is walked again by full collections."""
        if self._saved_thresholds is None:
            return
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        gc.set_threshold(*self._saved_thresholds)
        self._saved_thresholds = None
        gc.unfreeze()

    def _rearm(self) -> None:
        self._last_pass_at = self._clock()
        memory = self._memory()
        self._reclaim_at = memory + max(self._min_regrowth, int(memory * self._regrowth))

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, before and after each pass, on whichever thread allocated:
        # it allocates little (no collection starts during another) and only logs through the
        # loop. freeze/unfreeze only move the generations' lists from one to another.
        generation = info["generation"]
        if phase == "start":
            if self._whole_heap and generation == 2:
                self._started = time.perf_counter()
            return
        if generation == 0:
            return
        if self._whole_heap:
            if generation != 2:
                return  # the unfrozen heap waits for a full collection
            self._whole_heap = False
            self.stats.whole_heap_passes += 1
            self.stats.last_whole_heap_pass_s = time.perf_counter() - self._started
            self.stats.last_unreachable = info["collected"]
            gc.freeze()
            self._rearm()
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._log_pass, self.stats.last_whole_heap_pass_s, info["collected"])
            return
        gc.freeze()
        self.stats.freezes += 1
        if self._memory() > self._reclaim_at and self._clock() - self._last_pass_at >= self._min_interval_s:
            gc.unfreeze()  # the next full collection walks everything once, and frees dead cycles
            self._whole_heap = True

    @staticmethod
    def _log_pass(seconds: float, unreachable: int) -> None:
        log.info(
            "garbage collector: whole-heap pass in %.0f ms, %d unreachable objects freed", seconds * 1000, unreachable
        )
