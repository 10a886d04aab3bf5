"""What keeps the public web chat usable under abuse: who may connect (``Origin``), how often
(token buckets per client address and per socket), and how refusals are logged (counted, at
most one line per minute per socket or endpoint, never one per frame).

Everything here is in memory and bounded: a bucket per socket lives as long as the socket, and
the per-address buckets forget an address once it has its whole budget back.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

DROP_LOG_INTERVAL_S = 60.0


def address_key(address: str) -> str:
    """The unit one limit counts: an IPv4 address, or an IPv6 /64 (one subscriber usually
    holds a whole /64, so counting single IPv6 addresses would be no limit at all)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class OriginPolicy:
    """Which pages may use the chat: the gateway's own origin, plus ``allowed`` (origins as
    browsers send them, ``https://shop.example.com``). A request without ``Origin`` is not a
    browser page's and is let through (the contract allows non-browser clients)."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(allowed)
        self._allowed = frozenset(self.allowed)

    def allows(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        origin = origin.strip().lower()
        if origin in self._allowed:
            return True
        # The page's own origin: the host (and port) the browser asked for, i.e. the Host header
        # of this very request. The scheme is not compared: behind a TLS proxy the socket is http.
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:
            return False
        return bool(netloc) and netloc == request.host.lower()

    def frame_ancestors(self) -> str:
        """The CSP ``frame-ancestors`` value: the pages allowed to show the chat in a frame."""
        return " ".join(["'self'", *self.allowed])


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``capacity`` at once, refilled at ``per_s`` tokens a second."""

    capacity: float
    per_s: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.at) * self.per_s)
        self.at = now

    @classmethod
    def full(cls, count: int, period_s: float, now: float) -> Bucket:
        """``count`` per ``period_s``, starting full."""
        return cls(float(count), count / period_s, float(count), now)


class KeyedBuckets:
    """A bucket per key (client address), created full on first use. Keys whose bucket is full
    again are forgotten when the map has doubled since the last sweep, so memory follows the
    number of recently active keys."""

    def __init__(self, count: int, period_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._period_s = period_s
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}
        self._sweep_at = 1024

    def take(self, key: str) -> bool:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[key] = Bucket.full(self._count, self._period_s, now)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self._buckets[key]
        self._sweep_at = max(1024, 2 * len(self._buckets))


class DropLog:
    """Counts what one socket (or endpoint) refused, by reason, and logs it in aggregate: the
    first refusal at once, then at most one line per ``interval_s`` with the counts since the
    last line, and the rest at ``flush`` (the socket closed). A flood of a million frames
    writes a line a minute, not a million."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval_s: float = DROP_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._interval_s = interval_s
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._last_line_at: float | None = None
        self.total = 0

    def count(self, reason: str) -> None:
        self._counts[reason] += 1
        self.total += 1
        now = self._clock()
        if self._last_line_at is None or now - self._last_line_at >= self._interval_s:
            self._line(now)

    def flush(self) -> None:
        if self._counts:
            self._line(self._clock())

    def _line(self, now: float) -> None:
        since = "" if self._last_line_at is None else f" in the last {now - self._last_line_at:.0f} s"
        detail = ", ".join(f"{reason}={n}" for reason, n in sorted(self._counts.items()))
        self._log.warning("%s: refused %d%s (%s)", self._what, sum(self._counts.values()), since, detail)
        self._counts.clear()
        self._last_line_at = now
