"""``/healthz``'s view of the store: can it still write? Asked at most once a second (every
probe is a real write), one probe at a time; concurrent health checks share its answer."""

from __future__ import annotations

import asyncio
import logging

from gateway.store.base import Store

log = logging.getLogger("gateway.health")

CHECK_EVERY_S = 1.0


class StoreHealth:
    """``await problem()``: None while the store can write, else the reason it cannot."""

    def __init__(self, store: Store, *, every_s: float = CHECK_EVERY_S) -> None:
        self._store = store
        self._every_s = every_s
        self._checked_at: float | None = None
        self._problem: str | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def problem(self) -> str | None:
        now = asyncio.get_running_loop().time()
        if self._checked_at is not None and now - self._checked_at < self._every_s:
            return self._problem
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
        # Shielded: a health check whose client went away does not cancel the others' probe.
        return await asyncio.shield(self._running)

    async def _check(self) -> str | None:
        try:
            problem = await self._store.check_writable()
        except Exception as exc:  # a store that cannot even say is not writable
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            self._running = None
        if problem != self._problem:
            if problem is None:
                log.info("store writable again")
            else:
                log.error("store cannot write, /healthz answers 503: %s", problem)
        self._problem = problem
        self._checked_at = asyncio.get_running_loop().time()
        return problem
