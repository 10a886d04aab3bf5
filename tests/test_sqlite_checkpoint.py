"""WAL checkpoints off the writer's path (gateway/store/sqlite_checkpoint.py), on a real SQLite
file: committed writes reach the database file without the writer checkpointing, and a writer
that never pauses still keeps the WAL file bounded."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.models import Change, Session
from gateway.store import sqlite_checkpoint
from gateway.store.sqlite import SqliteStore

T0 = 1_700_000_000.0


def session(n: int, *, variables: dict[str, str] | None = None) -> Session:
    return Session(
        id=f"s{n:06d}", endpoint="web", channel="webchat", conversation=f"c{n}", started_at=T0,
        last_activity_at=T0, expires_at=T0 + 60, variables=variables,
    )  # fmt: skip


def sessions_in_the_database_file(path: Path) -> int:
    """Sessions in the main file alone: ``immutable`` reads no WAL (nor may the file change)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM sessions").fetchone()[0])
    finally:
        conn.close()


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SqliteStore]:
    monkeypatch.setattr(sqlite_checkpoint, "EVERY_S", 0.02)
    opened = SqliteStore(tmp_path / "gateway.db")
    await opened.open()
    yield opened
    await opened.aclose()


async def test_commits_reach_the_database_file_through_the_checkpointer(store: SqliteStore, tmp_path: Path) -> None:
    checkpointer = store.checkpointer
    assert checkpointer is not None
    before = checkpointer.checkpoints
    await store.commit(Change(sessions=[session(n) for n in range(300)]))
    await wait_until(lambda: checkpointer.checkpoints > before)
    await checkpointer.aclose()  # no checkpoint runs while the file is read as immutable
    assert sessions_in_the_database_file(tmp_path / "gateway.db") == 300
    assert checkpointer.writer_checkpoints == 0  # a small WAL: the writer never had to


async def test_a_writer_that_never_pauses_keeps_the_wal_bounded(
    store: SqliteStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = store.checkpointer
    assert checkpointer is not None
    monkeypatch.setattr(checkpointer, "_wal_limit_pages", 64)
    wal = tmp_path / "gateway.db-wal"
    payload = {"blob": "x" * 2000}  # about a page per session
    n = 0

    async def write_until(checkpoints: int) -> None:
        nonlocal n
        while checkpointer.writer_checkpoints < checkpoints:
            # Always a write queued behind the one in hand: the writer never pauses.
            batch = [session(n + i, variables=payload) for i in range(50)]
            await asyncio.gather(*(store.commit(Change(sessions=[s])) for s in batch))
            n += len(batch)
            assert n < 200_000, "the writer was never asked to checkpoint"

    await write_until(3)
    first_sessions, first_size = n, os.path.getsize(wal)
    await write_until(30)
    # Five times as much written again (without the writer's checkpoints the WAL grows with
    # it)... while the WAL, reused from its start, stays within what a busy moment adds.
    assert n > 5 * first_sessions
    assert os.path.getsize(wal) < 3 * first_size
    await checkpointer.aclose()
    assert sessions_in_the_database_file(tmp_path / "gateway.db") > first_sessions
