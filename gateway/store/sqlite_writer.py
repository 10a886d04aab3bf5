"""The SQLite store's group-commit writer: every write goes through one queue and one connection.

aiosqlite runs each connection's calls on its own thread, one at a time (DESIGN.md, known traps).
So the writer task takes all that is queued (up to ``MAX_BATCH_OPS``) and applies it as one
transaction with one commit: a small batch (``INLINE_ROWS``) right there on the event loop's
thread, a bigger one on the writer thread in ONE hop. Rows of one shape go in as one statement
(see sqlite_rows.py). Each write still fails alone: a failing batch is rolled back to its
savepoint and bisected.

Writes are plain data (``Work``), built on the event loop when submitted, so the writer thread
never reads a model object the loop may be changing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import aiosqlite
import orjson

from gateway.errors import StoreError
from gateway.models import Change, SessionState
from gateway.store import sqlite_rows as rows
from gateway.store.sqlite_schema import run, run_here

log = logging.getLogger("gateway.store")

MAX_BATCH_OPS = 2000  # writes per transaction
# A batch of at most this many rows commits on the event loop's own thread. The hop to the
# writer thread and back (its wake-up, the loop's self-pipe, two more loop iterations) took
# ~1.2 ms at the median against ~0.2 ms for such a transaction itself (bench/delivery.py,
# 500 webhooks/s: 1.4 writes per batch), and a message waits for two of them before its reply
# goes out. Bigger batches (a mass expiry, a prune) still go to the thread, so that the loop
# and SQLite can work at once (bench/ingest.py: 64 rows bought 1.13x req/s over 16; 256 no more).
INLINE_ROWS = 64
# An inline transaction slower than INLINE_SLOW_S (a disk that stalls) sends every batch to the
# writer thread for INLINE_PAUSE_S: a stalled write must not hold the event loop twice in a row.
INLINE_SLOW_S = 0.02
INLINE_PAUSE_S = 10.0
PRUNE_CHUNK = 5000  # rows per table per delete, so a big prune never holds the writer long


# -- write operations: plain data built on the loop, applied on the writer thread -----------------


@dataclass(slots=True)
class ChangeRows:
    sessions: list[rows.Row]
    closes: list[rows.Row]
    contacts: list[rows.Row]
    outbox: list[rows.Row]
    handled: list[int]
    updates: list[rows.Row]
    notices: list[tuple[str, str]]  # (session_id, notice)


@dataclass(slots=True, frozen=True)
class InboundRow:
    endpoint: str
    dedup_key: str
    payload: str
    arrival_at: float
    contact_id: str  # read back as the batch commits (StoredEvent.contact)


@dataclass(slots=True, frozen=True)
class SetOverride:
    scope: str
    value: str | None  # None deletes


@dataclass(slots=True, frozen=True)
class Prune:
    before: float
    holding_channels: str  # a JSON list


@dataclass(slots=True, frozen=True)
class PartsSent:
    message_id: int
    parts_sent: int


@dataclass(slots=True, frozen=True)
class Exec:
    """Statements run in order, as one write (erasure, deletes, retention); the result is the
    number of rows they changed. Applied alone in its segment, so it keeps its place among the
    writes queued around it."""

    statements: tuple[tuple[str, tuple[Any, ...]], ...]


@dataclass(slots=True, frozen=True)
class AddSecret:
    endpoint: str
    conversation: str
    secret_hash: str
    created_at: float


@dataclass(slots=True, frozen=True)
class Probe:
    """A write that changes nothing: rewrites the header page (``user_version``) and commits."""


@dataclass(slots=True, frozen=True)
class Checkpoint:
    """Checkpoint the WAL right after this batch commits, before the next one begins (the
    WAL grew too long for the checkpointer's own, see sqlite_checkpoint.py)."""


Work = ChangeRows | InboundRow | SetOverride | Prune | PartsSent | Exec | AddSecret | Probe | Checkpoint


@dataclass(slots=True)
class _Op:
    work: Work
    future: asyncio.Future[Any]
    change: Change | None = None  # its outbox messages get their ids when the batch commits


def _apply_batch(conn: sqlite3.Connection, works: list[Work]) -> list[Any]:
    """Apply a batch in one transaction: each work's result, or the exception that failed it alone."""
    results: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for segment in _segments(works):
            results += _apply_segment(conn, segment)
        _read_contacts(conn, works, results)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    for i, work in enumerate(works):
        if isinstance(work, Checkpoint):  # outside the transaction; its failure is its own
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                results[i] = exc
            break
    return results


def _segments(works: list[Work]) -> Iterator[list[Work]]:
    """Cut the batch where merging would reorder writes: notices are applied after all session
    upserts of a segment, so a session upserted after a notice to it starts a new segment; an
    ``Exec`` (plain statements, e.g. an erasure) is a segment of its own."""
    start = 0
    noticed: set[str] = set()
    for i, work in enumerate(works):
        if isinstance(work, Exec):
            if i > start:
                yield works[start:i]
            yield [work]
            start, noticed = i + 1, set()
            continue
        if isinstance(work, ChangeRows):
            if noticed and any(row[0] in noticed for row in (*work.sessions, *work.closes)):
                yield works[start:i]
                start, noticed = i, set()
            noticed.update(session_id for session_id, _ in work.notices)
    if start < len(works):
        yield works[start:]


def _apply_segment(conn: sqlite3.Connection, works: list[Work]) -> list[Any]:
    """Apply ``works`` merged under a savepoint. On an error roll back and bisect, so that only
    the failing work fails and k failures among n works cost about k*log2(n) retries."""
    conn.execute("SAVEPOINT segment")
    try:
        results = _apply_merged(conn, works)
    except (sqlite3.Error, ValueError, TypeError) as exc:  # TypeError: a value with no JSON form
        conn.execute("ROLLBACK TO segment")
        conn.execute("RELEASE segment")
        if len(works) == 1:
            return [exc]
        half = len(works) // 2
        return _apply_segment(conn, works[:half]) + _apply_segment(conn, works[half:])
    conn.execute("RELEASE segment")
    return results


def _apply_merged(conn: sqlite3.Connection, works: list[Work]) -> list[Any]:
    changes = [work for work in works if isinstance(work, ChangeRows)]
    inbound_ids = iter(_insert_inbound(conn, [work for work in works if isinstance(work, InboundRow)]))
    outbox_ids = _insert_outbox(conn, [row for change in changes for row in change.outbox])
    sessions = [row for change in changes for row in change.sessions]
    _bulk(conn, rows.UPSERT_CLOSED_SESSIONS, [row for row in sessions if row[rows.SESSION_STATE] != SessionState.OPEN])
    _close_sessions(conn, [row for change in changes for row in change.closes])
    _bulk(conn, rows.UPSERT_OPEN_SESSIONS, [row for row in sessions if row[rows.SESSION_STATE] == SessionState.OPEN])
    _bulk(conn, rows.UPSERT_CONTACTS, [row for change in changes for row in change.contacts])
    _bulk(conn, rows.MARK_HANDLED, [event_id for change in changes for event_id in change.handled])
    # One row per id, the last one winning, as if the changes had been applied one by one.
    _bulk(conn, rows.UPDATE_OUTBOX, list({row[-1]: row for change in changes for row in change.updates}.values()))
    _bulk(conn, rows.SET_NOTICES, list({row[0]: row for change in changes for row in change.notices}.values()))
    progress = {work.message_id: (work.message_id, work.parts_sent) for work in works if isinstance(work, PartsSent)}
    _bulk(conn, rows.SET_PARTS_SENT, list(progress.values()))
    results: list[Any] = []
    for work in works:
        if isinstance(work, ChangeRows):
            results.append([outbox_ids[row[0]] for row in work.outbox])
        elif isinstance(work, InboundRow):
            results.append(next(inbound_ids))
        elif isinstance(work, PartsSent | Checkpoint):
            results.append(None)
        elif isinstance(work, AddSecret):
            conn.execute(
                "INSERT INTO conversation_secrets (endpoint, conversation, secret_hash, created_at) "
                "VALUES (?, ?, ?, ?)",
                (work.endpoint, work.conversation, work.secret_hash, work.created_at),
            )
            results.append(None)
        elif isinstance(work, SetOverride):
            if work.value is None:
                conn.execute("DELETE FROM overrides WHERE scope = ?", (work.scope,))
            else:
                conn.execute("INSERT OR REPLACE INTO overrides (scope, value) VALUES (?, ?)", (work.scope, work.value))
            results.append(None)
        elif isinstance(work, Exec):
            results.append(sum(conn.execute(sql, params).rowcount for sql, params in work.statements))
        elif isinstance(work, Prune):
            results.append(_prune_chunk(conn, work))
        else:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version = {version}")  # dirties page 1: a real write
            results.append(None)
    return results


def _read_contacts(conn: sqlite3.Connection, works: list[Work], results: list[Any]) -> None:
    """Each new inbound event's result becomes ``(event id, its contact as the batch commits
    it, or None)``: one query for the batch, one object per event (callers change them)."""
    new = [i for i, work in enumerate(works) if isinstance(work, InboundRow) and isinstance(results[i], int)]
    if not new:
        return
    wanted = orjson.dumps([cast(InboundRow, works[i]).contact_id for i in new]).decode()
    found = {row[0]: row for row in conn.execute(rows.SELECT_CONTACTS, (wanted,))}
    for i in new:
        row = found.get(cast(InboundRow, works[i]).contact_id)
        results[i] = (results[i], None if row is None else rows.row_to_contact(row))


def _bulk(conn: sqlite3.Connection, sql: str, batch: list[Any]) -> None:
    if batch:
        conn.execute(sql, (_json_text(batch),))


def _close_sessions(conn: sqlite3.Connection, closes: list[rows.Row]) -> None:
    """``close_row`` rows, one statement per (closed_at, close_reason, notice) in order of first
    appearance; of two closes of one session the first applied wins (closed is final)."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for session_id, closed_at, reason, notice, expires_at in closes:
        groups.setdefault((closed_at, reason, notice), {}).setdefault(session_id, expires_at)
    for (closed_at, reason, notice), expiries in groups.items():
        conn.execute(rows.CLOSE_SESSIONS, (closed_at, reason, notice, orjson.dumps(expiries).decode()))


def _json_text(rows: list[Any]) -> str:
    """Rows as one JSON array for ``json_each``. orjson, not json: this runs holding the GIL (on
    the writer thread or the loop's), and formats floats (every timestamp) several times faster. A NaN has no JSON
    form; orjson writes ``null`` for it, which the NOT NULL columns refuse (the write fails alone)."""
    return orjson.dumps(rows).decode()


def _insert_inbound(conn: sqlite3.Connection, works: list[InboundRow]) -> list[int | None]:
    """Insert new events; the id of each, or None for a redelivery (also of one earlier in ``works``)."""
    if not works:
        return []
    newer_than = conn.execute("SELECT ifnull(max(id), 0) FROM inbound").fetchone()[0]  # AUTOINCREMENT ids grow
    _bulk(conn, rows.INSERT_INBOUND, [[w.endpoint, w.dedup_key, w.payload, w.arrival_at] for w in works])
    added = conn.execute(rows.NEW_INBOUND_IDS, (newer_than,)).fetchone()[0]
    ids = {(endpoint, key): event_id for endpoint, key, event_id in orjson.loads(added)}
    return [ids.pop((w.endpoint, w.dedup_key), None) for w in works]


def _insert_outbox(conn: sqlite3.Connection, batch: list[rows.Row]) -> dict[str, int]:
    """Insert messages whose key is new; key -> id of every message in ``batch``."""
    if not batch:
        return {}
    keys = _json_text(batch)
    conn.execute(rows.INSERT_OUTBOX, (keys,))
    return cast(dict[str, int], orjson.loads(conn.execute(rows.OUTBOX_IDS, (keys,)).fetchone()[0]))


def _prune_chunk(conn: sqlite3.Connection, work: Prune) -> int:
    deleted = conn.execute(
        "DELETE FROM inbound WHERE id IN (SELECT id FROM inbound WHERE state = 'done' AND arrival_at < ? LIMIT ?)",
        (work.before, PRUNE_CHUNK),
    ).rowcount
    # Messages kept for users who never came back, e.g. web chat frames (DESIGN.md, retention: 7 days).
    held = conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' "
        "AND channel IN (SELECT value FROM json_each(?)) AND created_at < ? LIMIT ?)",
        (work.holding_channels, work.before, PRUNE_CHUNK),
    ).rowcount
    # Issued web chat conversations in which nobody ever said anything (e.g. a flood of hellos).
    unused = conn.execute(
        "DELETE FROM conversation_secrets WHERE rowid IN (SELECT c.rowid FROM conversation_secrets AS c "
        "WHERE c.created_at < ? AND NOT EXISTS (SELECT 1 FROM sessions AS s "
        "WHERE s.contact_id = c.endpoint || ':' || c.conversation) LIMIT ?)",
        (work.before, PRUNE_CHUNK),
    ).rowcount
    return deleted + held + unused


def _rows(works: list[Work]) -> int:
    """About how many rows ``works`` write, counted up to just past ``INLINE_ROWS``; large for
    work of unknown size (deletes, prunes, checkpoints), which never runs on the loop."""
    rows = 0
    for work in works:
        if isinstance(work, ChangeRows):
            rows += (
                len(work.sessions)
                + len(work.closes)
                + len(work.contacts)
                + len(work.outbox)
                + len(work.handled)
                + len(work.updates)
                + len(work.notices)
            )
        elif isinstance(work, Exec | Prune | Checkpoint):
            return MAX_BATCH_OPS * 1000
        else:
            rows += 1
        if rows > INLINE_ROWS:
            break  # enough to know
    return rows


def _fail(future: asyncio.Future[Any], message: str, cause: BaseException) -> None:
    """Fail one caller with its own StoreError (an exception instance is never shared)."""
    if not future.done():
        error = StoreError(message)
        error.__cause__ = cause
        future.set_exception(error)


# -- the writer task ------------------------------------------------------------------------------


class GroupCommitWriter:
    """Applies submitted writes on ``conn``, everything queued in one transaction (on the loop's
    thread when small, ``INLINE_ROWS``; else in one hop to the connection's thread).

    Created inside the running loop (it starts its task). ``batches_committed`` counts write
    transactions and ``ops_committed`` the writes in them; their ratio is the group-commit factor.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._queue: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self.batches_committed = 0
        self.ops_committed = 0
        self.inline_batches = 0  # committed on the event loop's thread (INLINE_ROWS)
        self._inline_paused_until = 0.0  # loop time
        # Kept, not looked up per write: on Python 3.11 every get_running_loop() is a getpid()
        # system call (three writes per message).
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._write_loop(), name="sqlite-writer")

    def submit(self, work: Work, change: Change | None = None) -> asyncio.Future[Any]:
        """Queue ``work``; the future gets its result once its batch committed. A write is applied
        even if the caller stops waiting (the future is not the write)."""
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queue.append(_Op(work, future, change))
        self._wakeup.set()
        return future

    async def stop(self) -> None:
        """Apply what is queued, then end the task (returns also if the task was cancelled)."""
        self._stopping = True
        self._wakeup.set()
        await asyncio.gather(self._task, return_exceptions=True)

    def _apply_inline(self, works: list[Work]) -> list[Any]:
        """Apply a small batch on the loop's thread; a slow one pauses this for a while."""
        started = time.perf_counter()
        try:
            return run_here(self._conn, _apply_batch, works)
        finally:
            self.inline_batches += 1
            took_s = time.perf_counter() - started
            if took_s > INLINE_SLOW_S:
                self._inline_paused_until = self._loop.time() + INLINE_PAUSE_S
                log.warning(
                    "a small write batch took %.0f ms on the event loop; the writer thread takes every "
                    "batch for the next %.0f s",
                    took_s * 1000,
                    INLINE_PAUSE_S,
                )

    async def _write_loop(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH_OPS))]
            works = [op.work for op in batch]
            try:
                if _rows(works) <= INLINE_ROWS and self._loop.time() >= self._inline_paused_until:
                    results = self._apply_inline(works)
                else:
                    results = await run(self._conn, _apply_batch, works)
            except Exception as exc:  # the whole transaction failed, so did every write in it
                for op in batch:
                    _fail(op.future, f"write batch failed: {exc}", exc)
                continue
            self.batches_committed += 1
            for op, result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    _fail(op.future, f"sqlite: {result}", result)
                    continue
                self.ops_committed += 1
                if op.change is not None:  # committed even if the caller stopped waiting
                    for message, message_id in zip(op.change.outbox, result, strict=True):
                        message.id = message_id
                    result = None  # a commit's caller awaits None (Store.commit)
                if not op.future.done():
                    op.future.set_result(result)
