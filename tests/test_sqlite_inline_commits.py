"""Small write batches commit on the event loop's own thread, big ones on the writer's thread,
and a slow one on the loop sends the next ones to the thread (gateway/store/sqlite_writer.py),
on a real SQLite file."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Change, Session
from gateway.store import sqlite_writer
from gateway.store.sqlite import SqliteStore

T0 = 1_700_000_000.0


def session(n: int) -> Session:
    return Session(
        id=f"s{n:06d}", endpoint="web", channel="webchat", conversation=f"c{n}", started_at=T0,
        last_activity_at=T0, expires_at=T0 + 60,
    )  # fmt: skip


class Threads:
    """Which thread applied each write batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[int] = []
        apply = sqlite_writer._apply_batch

        def recording(conn: sqlite3.Connection, works: list[Any]) -> list[Any]:
            self.seen.append(threading.get_ident())
            return apply(conn, works)

        monkeypatch.setattr(sqlite_writer, "_apply_batch", recording)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "gateway.db")
    await opened.open()
    yield opened
    await opened.aclose()


async def test_small_batches_commit_on_the_loop_and_big_ones_on_the_writer_thread(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = Threads(monkeypatch)
    loop_thread = threading.get_ident()
    await store.commit(Change(sessions=[session(1)]))
    big = [session(n) for n in range(2, 2 + sqlite_writer.INLINE_ROWS + 1)]
    await store.commit(Change(sessions=big))
    assert threads.seen[0] == loop_thread
    assert threads.seen[1] != loop_thread
    for expected in (session(1), big[-1]):
        stored = await store.get_session(expected.id)
        assert stored is not None and stored.conversation == expected.conversation


async def test_a_slow_batch_on_the_loop_sends_the_next_ones_to_the_writer_thread(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    threads = Threads(monkeypatch)
    monkeypatch.setattr(sqlite_writer, "INLINE_SLOW_S", 0.0)  # every batch is "slow"
    loop_thread = threading.get_ident()
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        await store.commit(Change(sessions=[session(1)]))
        await store.commit(Change(sessions=[session(2)]))
    assert threads.seen == [loop_thread, threads.seen[1]] and threads.seen[1] != loop_thread
    assert "the writer thread takes every batch" in caplog.text
    assert await store.get_session(session(2).id) is not None
