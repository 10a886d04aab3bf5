"""The machine's Redis for tests: a key prefix of each test's own, every key under it deleted at
teardown. Tests that need Redis are skipped, saying why, only when it cannot be reached."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unreachable_reason() -> str | None:
    """None when Redis answers a PING, else why not."""
    try:
        with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def delete_prefix(prefix: str) -> int:
    """Delete every key under ``<prefix>:``; returns how many went."""
    deleted = 0
    with redis.Redis.from_url(REDIS_URL) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    return deleted


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the test Redis, cleaned up afterwards."""
    reason = unreachable_reason()
    if reason is not None:
        pytest.skip(f"Redis at {REDIS_URL} is unreachable ({reason}); the Redis backend is not tested")
    prefix = f"gwtest-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        delete_prefix(prefix)
