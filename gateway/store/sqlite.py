"""The embedded SQLite store: group-committed writes on one connection, reads on another.

aiosqlite runs each connection's calls on its own thread, one at a time (DESIGN.md, known traps):

- Writes (``add_inbound``, ``commit``, overrides, prune) are queued. One writer task takes all
  that is queued (up to ``MAX_BATCH_OPS``) to the writer thread in ONE hop and applies it as one
  transaction with one commit. Rows of one shape go in as one statement (see sqlite_rows.py).
  Each write still fails alone: a failing batch is rolled back to its savepoint and bisected.
- Reads use a second, ``query_only`` connection: admin, analytics and restore never wait behind
  a write batch.
- WAL with ``synchronous=NORMAL``: a commit survives a crash (kill -9) of the process, not a
  power loss of the machine.
- One process per database: an exclusive ``flock`` on ``<db>.lock``, which the kernel releases
  when the process dies, however it dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import aiosqlite

from gateway.errors import StoreError, StoreLocked
from gateway.models import Change, Contact, InboundEvent, OutboundMessage, Session, SessionState, StoredEvent
from gateway.store import sqlite_health as health
from gateway.store import sqlite_rows as rows
from gateway.store.base import SessionQuery

# Migration n (1-based) brings the schema from user_version n-1 to n. Append, never edit.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE contacts (
            id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, conversation TEXT NOT NULL,
            created_at REAL NOT NULL, display_name TEXT, opted_out INTEGER NOT NULL,
            last_user_message_at REAL, variables TEXT NOT NULL, auth_profiles TEXT NOT NULL)""",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, channel TEXT NOT NULL,
            conversation TEXT NOT NULL, contact_id TEXT NOT NULL, started_at REAL NOT NULL,
            last_activity_at REAL NOT NULL, expires_at REAL, state TEXT NOT NULL,
            interactive INTEGER NOT NULL, developer INTEGER NOT NULL, closed_at REAL,
            close_reason TEXT, notice TEXT, message_count INTEGER NOT NULL, intent TEXT,
            variables TEXT, context TEXT)""",
        # The "one open session per conversation" rule, enforced by the database itself.
        "CREATE UNIQUE INDEX sessions_one_open ON sessions (endpoint, conversation) WHERE state = 'open'",
        # Closing a session changes only `state` among indexed columns, so `state` is in no index
        # but the partial one above (which restore also pages through): a close touches one small
        # index (measured: at 1M rows, indexes keyed on state made a 100k/s expiry burst commit
        # seconds late).
        "CREATE INDEX sessions_by_endpoint ON sessions (endpoint, started_at, id)",
        "CREATE INDEX sessions_by_contact ON sessions (contact_id, started_at, id)",
        "CREATE INDEX sessions_by_start ON sessions (started_at, id)",
        """CREATE TABLE inbound (
            id INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT NOT NULL, dedup_key TEXT NOT NULL,
            payload TEXT NOT NULL, arrival_at REAL NOT NULL, state TEXT NOT NULL,
            UNIQUE (endpoint, dedup_key))""",
        "CREATE INDEX inbound_pending ON inbound (id) WHERE state = 'pending'",
        "CREATE INDEX inbound_done ON inbound (arrival_at) WHERE state = 'done'",
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, endpoint TEXT NOT NULL,
            channel TEXT NOT NULL, conversation TEXT NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL,
            created_at REAL NOT NULL, session_id TEXT, reply_token TEXT, reply_token_expires_at REAL,
            user_last_seen_at REAL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL, last_error TEXT, sent_at REAL)""",
        "CREATE INDEX outbox_by_state ON outbox (state, id)",
        "CREATE TABLE overrides (scope TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
]

MAX_BATCH_OPS = 2000  # writes per transaction
READ_CHUNK = 5000  # sessions per hop while streaming open_sessions
PRUNE_CHUNK = 5000  # rows per table per delete, so a big prune never holds the writer long
BUSY_TIMEOUT_MS = 5000
PROBE_TIMEOUT_S = 2.0  # check_writable's write


P = ParamSpec("P")
T = TypeVar("T")


async def _run(
    conn: aiosqlite.Connection, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn(raw_connection, ...)`` on the connection's thread in ONE hop.

    aiosqlite offers no public call for "run this function on your thread"; its private
    ``_execute`` and ``_conn`` do exactly that, which is why pyproject pins aiosqlite <0.23.
    This is the only place that touches them. sqlite3 errors come back as ``StoreError``.
    """
    try:
        result = await conn._execute(fn, conn._conn, *args, **kwargs)  # type: ignore[no-untyped-call]
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc
    return cast(T, result)


# -- write operations: plain data built on the loop, applied on the writer thread -----------------


@dataclass(slots=True)
class _ChangeRows:
    sessions: list[rows.Row]
    closes: list[rows.Row]
    contacts: list[rows.Row]
    outbox: list[rows.Row]
    handled: list[int]
    updates: list[rows.Row]
    notices: list[tuple[str, str]]  # (session_id, notice)


@dataclass(slots=True, frozen=True)
class _InboundRow:
    endpoint: str
    dedup_key: str
    payload: str
    arrival_at: float


@dataclass(slots=True, frozen=True)
class _SetOverride:
    scope: str
    value: str | None  # None deletes


@dataclass(slots=True, frozen=True)
class _Prune:
    before: float
    holding_channels: str  # a JSON list


@dataclass(slots=True, frozen=True)
class _Probe:
    """A write that changes nothing: rewrites the header page (``user_version``) and commits."""


_Work = _ChangeRows | _InboundRow | _SetOverride | _Prune | _Probe


@dataclass(slots=True)
class _Op:
    work: _Work
    future: asyncio.Future[Any]
    change: Change | None = None  # its outbox messages get their ids when the batch commits


def _apply_batch(conn: sqlite3.Connection, works: list[_Work]) -> list[Any]:
    """Apply a batch in one transaction: each work's result, or the exception that failed it alone."""
    results: list[Any] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for segment in _segments(works):
            results += _apply_segment(conn, segment)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


def _segments(works: list[_Work]) -> Iterator[list[_Work]]:
    """Cut the batch where merging would reorder writes: notices are applied after all session
    upserts of a segment, so a session upserted after a notice to it starts a new segment."""
    start = 0
    noticed: set[str] = set()
    for i, work in enumerate(works):
        if isinstance(work, _ChangeRows):
            if noticed and any(row[0] in noticed for row in (*work.sessions, *work.closes)):
                yield works[start:i]
                start, noticed = i, set()
            noticed.update(session_id for session_id, _ in work.notices)
    yield works[start:]


def _apply_segment(conn: sqlite3.Connection, works: list[_Work]) -> list[Any]:
    """Apply ``works`` merged under a savepoint. On an error roll back and bisect, so that only
    the failing work fails and k failures among n works cost about k*log2(n) retries."""
    conn.execute("SAVEPOINT segment")
    try:
        results = _apply_merged(conn, works)
    except (sqlite3.Error, ValueError, TypeError) as exc:  # the last two: a value with no JSON form (NaN)
        conn.execute("ROLLBACK TO segment")
        conn.execute("RELEASE segment")
        if len(works) == 1:
            return [exc]
        half = len(works) // 2
        return _apply_segment(conn, works[:half]) + _apply_segment(conn, works[half:])
    conn.execute("RELEASE segment")
    return results


def _apply_merged(conn: sqlite3.Connection, works: list[_Work]) -> list[Any]:
    changes = [work for work in works if isinstance(work, _ChangeRows)]
    inbound_ids = iter(_insert_inbound(conn, [work for work in works if isinstance(work, _InboundRow)]))
    outbox_ids = _insert_outbox(conn, [row for change in changes for row in change.outbox])
    sessions = [row for change in changes for row in change.sessions]
    _bulk(conn, rows.UPSERT_CLOSED_SESSIONS, [row for row in sessions if row[rows.SESSION_STATE] != SessionState.OPEN])
    _bulk(conn, rows.CLOSE_SESSIONS, [row for change in changes for row in change.closes])
    _bulk(conn, rows.UPSERT_OPEN_SESSIONS, [row for row in sessions if row[rows.SESSION_STATE] == SessionState.OPEN])
    _bulk(conn, rows.UPSERT_CONTACTS, [row for change in changes for row in change.contacts])
    _bulk(conn, rows.MARK_HANDLED, [event_id for change in changes for event_id in change.handled])
    # One row per id, the last one winning, as if the changes had been applied one by one.
    _bulk(conn, rows.UPDATE_OUTBOX, list({row[-1]: row for change in changes for row in change.updates}.values()))
    _bulk(conn, rows.SET_NOTICES, list({row[0]: row for change in changes for row in change.notices}.values()))
    results: list[Any] = []
    for work in works:
        if isinstance(work, _ChangeRows):
            results.append([outbox_ids[row[0]] for row in work.outbox])
        elif isinstance(work, _InboundRow):
            results.append(next(inbound_ids))
        elif isinstance(work, _SetOverride):
            if work.value is None:
                conn.execute("DELETE FROM overrides WHERE scope = ?", (work.scope,))
            else:
                conn.execute("INSERT OR REPLACE INTO overrides (scope, value) VALUES (?, ?)", (work.scope, work.value))
            results.append(None)
        elif isinstance(work, _Prune):
            results.append(_prune_chunk(conn, work))
        else:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            conn.execute(f"PRAGMA user_version = {version}")  # dirties page 1: a real write
            results.append(None)
    return results


def _bulk(conn: sqlite3.Connection, sql: str, batch: list[Any]) -> None:
    if batch:
        conn.execute(sql, (json.dumps(batch, allow_nan=False),))


def _insert_inbound(conn: sqlite3.Connection, works: list[_InboundRow]) -> list[int | None]:
    """Insert new events; the id of each, or None for a redelivery (also of one earlier in ``works``)."""
    if not works:
        return []
    newer_than = conn.execute("SELECT ifnull(max(id), 0) FROM inbound").fetchone()[0]  # AUTOINCREMENT ids grow
    _bulk(conn, rows.INSERT_INBOUND, [[w.endpoint, w.dedup_key, w.payload, w.arrival_at] for w in works])
    added = conn.execute(rows.NEW_INBOUND_IDS, (newer_than,)).fetchone()[0]
    ids = {(endpoint, key): event_id for endpoint, key, event_id in json.loads(added)}
    return [ids.pop((w.endpoint, w.dedup_key), None) for w in works]


def _insert_outbox(conn: sqlite3.Connection, batch: list[rows.Row]) -> dict[str, int]:
    """Insert messages whose key is new; key -> id of every message in ``batch``."""
    if not batch:
        return {}
    keys = json.dumps(batch, allow_nan=False)
    conn.execute(rows.INSERT_OUTBOX, (keys,))
    return cast(dict[str, int], json.loads(conn.execute(rows.OUTBOX_IDS, (keys,)).fetchone()[0]))


def _prune_chunk(conn: sqlite3.Connection, work: _Prune) -> int:
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
    return deleted + held


# -- open: lock, pragmas, migrations ----------------------------------------------------------------


def _take_lock(path: Path) -> int:
    """Create the directory, take the process lock on ``<path>.lock`` and write our pid into it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(f"database {path} is in use by another gateway process (pid {holder})") from None
    except OSError as exc:
        os.close(fd)  # closing also drops a lock we may have taken
        raise StoreError(f"cannot lock database {path}: {exc}") from exc
    return fd


def _prepare_writer(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"cannot switch the database to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the session indexes of a 1M-session run stay hot
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > len(MIGRATIONS):
        raise StoreError(f"database schema version {version} is newer than this gateway knows ({len(MIGRATIONS)})")
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _prepare_reader(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")


def _fail(future: asyncio.Future[Any], message: str, cause: BaseException) -> None:
    """Fail one caller with its own StoreError (an exception instance is never shared)."""
    if not future.done():
        error = StoreError(message)
        error.__cause__ = cause
        future.set_exception(error)


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class SqliteStore:
    """The ``Store`` on a SQLite file at ``path`` (created, with its directory, when missing).

    ``batches_committed`` counts write transactions and ``ops_committed`` the writes in them;
    their ratio is the group-commit factor.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._state = _State.NEW
        self._lock_fd: int | None = None
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._queue: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._writer_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self.batches_committed = 0
        self.ops_committed = 0
        self._identity: health.FileIdentity | None = None  # the file opened (gone? replaced?)

    def __repr__(self) -> str:
        return f"<SqliteStore {str(self._path)!r} {self._state.value} batches={self.batches_committed}>"

    async def open(self) -> None:
        """Take the process lock, connect writer and reader, apply migrations, start the writer.

        Raises ``StoreLocked`` when another process holds the database, ``StoreError`` otherwise.
        """
        if self._state is not _State.NEW:
            raise StoreError("store was opened already")
        self._state = _State.OPEN  # from here on aclose() has something to undo
        try:
            self._lock_fd = await asyncio.to_thread(_take_lock, self._path)
            self._writer = await self._connect()
            await _run(self._writer, _prepare_writer)
            self._reader = await self._connect()
            await _run(self._reader, _prepare_reader)
            self._identity = await asyncio.to_thread(health.FileIdentity.of, self._path)
        except BaseException:
            await self.aclose()
            raise
        self._writer_task = asyncio.create_task(self._write_loop(self._writer), name="sqlite-writer")

    async def _connect(self) -> aiosqlite.Connection:
        try:
            # isolation_level=None: no implicit BEGIN; the writer issues BEGIN/COMMIT itself.
            return await aiosqlite.connect(self._path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self._path}: {exc}") from exc

    async def aclose(self) -> None:
        """Commit what is queued, stop the writer, close both connections, release the lock.

        Safe to call twice; every call after open() returns once the store is fully closed.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        self._state = _State.CLOSED  # refuse new work; queued work is still flushed
        self._stopping = True
        self._wakeup.set()
        try:
            if self._writer_task is not None:  # it drains the queue, then returns
                await asyncio.gather(self._writer_task, return_exceptions=True)  # also if it was cancelled
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await conn.close()
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- writes ----------------------------------------------------------------------------------

    def _submit(self, work: _Work, change: Change | None = None) -> asyncio.Future[Any]:
        if self._state is not _State.OPEN or self._writer_task is None:
            raise StoreError(f"store {self._path} is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(work, future, change))
        self._wakeup.set()
        return future

    async def _write_loop(self, writer: aiosqlite.Connection) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH_OPS))]
            try:
                results = await _run(writer, _apply_batch, [op.work for op in batch])
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
                if not op.future.done():
                    op.future.set_result(result)

    async def add_inbound(self, endpoint: str, event: InboundEvent, arrival_at: float) -> StoredEvent | None:
        """Commit ``event`` as pending; None when (endpoint, dedup_key) was seen before (a redelivery)."""
        work = _InboundRow(endpoint, event.dedup_key, rows.event_to_json(event), arrival_at)
        event_id: int | None = await self._submit(work)
        return None if event_id is None else StoredEvent(event_id, endpoint, arrival_at, event)

    async def commit(self, change: Change) -> None:
        """Apply ``change`` atomically, group-committed with concurrent writes.

        The change is captured when called (later edits to its objects are not written) and is
        applied even if the caller stops waiting. New outbox messages get their ``id`` (for an
        existing key, the existing row's). A closed session is final: an open copy of it is
        ignored. Raises ``StoreError`` when this change fails; other writes are unaffected.
        """
        try:
            work = _ChangeRows(
                sessions=[rows.session_to_row(s) for s in change.sessions],
                closes=[rows.close_row(s) for s in change.closes],
                contacts=[rows.contact_to_row(c) for c in change.contacts],
                outbox=[rows.outbox_insert_row(m) for m in change.outbox],
                handled=list(change.handled_events),
                updates=[rows.outbox_update_row(m) for m in change.outbox_updates],
                notices=list(change.notices),
            )
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store change: {exc}") from exc
        await self._submit(work, change)

    async def put_override(self, scope: str, value: dict[str, Any]) -> None:
        """Store the runtime settings of ``scope``, replacing earlier ones."""
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store override {scope!r}: {exc}") from exc
        await self._submit(_SetOverride(scope, text))

    async def delete_override(self, scope: str) -> None:
        """Drop the runtime settings of ``scope`` (no error when there are none)."""
        await self._submit(_SetOverride(scope, None))

    async def check_writable(self, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """None when a write commits now; else why not (the file is gone or replaced, the disk
        is full, the probe write failed or took longer than ``timeout_s``)."""
        problem = await asyncio.to_thread(self._file_and_space_problem)
        if problem is not None:
            return problem
        try:
            async with asyncio.timeout(timeout_s):
                await self._submit(_Probe())
        except TimeoutError:
            return f"a write took longer than {timeout_s} s"
        except StoreError as exc:
            return str(exc)
        return None

    def _file_and_space_problem(self) -> str | None:
        return health.file_problem(self._path, self._identity) or health.space_problem(self._path)

    async def prune(self, before: float, *, holding_channels: Collection[str]) -> int:
        """Delete handled inbound events and messages still pending for ``holding_channels``
        (web chat) older than ``before``, a chunk per write so other writes interleave; returns
        the number of rows deleted."""
        work = _Prune(before, json.dumps(sorted(holding_channels)))
        total = 0
        while deleted := await self._submit(work):
            total += deleted
        return total

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._state is not _State.OPEN or self._reader is None:
            raise StoreError(f"store {self._path} is not open")
        return await _run(self._reader, fn, *args, **kwargs)

    async def open_sessions(self) -> AsyncIterator[Session]:
        """Every open session, by (endpoint, conversation), fetched ``READ_CHUNK`` at a time
        through the partial index of open sessions."""
        tail = "WHERE state = 'open' ORDER BY endpoint, conversation LIMIT ?"
        params: list[Any] = [READ_CHUNK]
        while chunk := await self._read(rows.select_sessions, tail, params):
            for session in chunk:
                yield session
            if len(chunk) < READ_CHUNK:
                return
            tail = "WHERE state = 'open' AND (endpoint, conversation) > (?, ?) ORDER BY endpoint, conversation LIMIT ?"
            params = [chunk[-1].endpoint, chunk[-1].conversation, READ_CHUNK]

    async def get_session(self, session_id: str) -> Session | None:
        """The session with this id, or None."""
        found = await self._read(rows.select_sessions, "WHERE id = ?", [session_id])
        return found[0] if found else None

    async def list_sessions(self, query: SessionQuery) -> tuple[list[Session], str | None]:
        """A page of sessions, newest first (started_at, then id), and the next page's cursor.

        Raises ValueError for a cursor this store did not produce.
        """
        clauses: list[str] = []
        params: list[Any] = []
        if query.state is not None:
            clauses.append("state = ?")
            params.append(query.state.value)
        if query.endpoint is not None:
            clauses.append("endpoint = ?")
            params.append(query.endpoint)
        if query.cursor is not None:
            clauses.append("(started_at, id) < (?, ?)")
            params.extend(rows.decode_cursor(query.cursor))
        limit = max(1, query.limit)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        page = await self._read(
            rows.select_sessions, f"{where}ORDER BY started_at DESC, id DESC LIMIT ?", [*params, limit + 1]
        )
        if len(page) <= limit:
            return page, None
        return page[:limit], rows.encode_cursor(page[limit - 1])

    async def get_contact(self, contact_id: str) -> Contact | None:
        """The contact with this id, or None."""
        return (await self._read(rows.select_contacts, [contact_id])).get(contact_id)

    async def get_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        """The contacts that exist among ``contact_ids``, by id, in one read."""
        return await self._read(rows.select_contacts, contact_ids) if contact_ids else {}

    async def contact_sessions(self, contact_id: str) -> list[Session]:
        """The contact's sessions (its conversation history, S6), newest first."""
        return await self._read(
            rows.select_sessions, "WHERE contact_id = ? ORDER BY started_at DESC, id DESC", [contact_id]
        )

    async def session_analytics(
        self, since: float | None, until: float | None
    ) -> list[tuple[str, bool, bool, str | None, int]]:
        """Sessions started in ``[since, until)`` counted by (endpoint, interactive, developer,
        close_reason): one GROUP BY on the reader connection, over the ``sessions_by_start`` index."""
        clauses: list[str] = []
        params: list[float] = []
        if since is not None:
            clauses.append("started_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("started_at < ?")
            params.append(until)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        sql = (
            "SELECT endpoint, interactive, developer, close_reason, count(*) FROM sessions "
            f"{where}GROUP BY endpoint, interactive, developer, close_reason"
        )

        def query(conn: sqlite3.Connection) -> list[tuple[str, bool, bool, str | None, int]]:
            return [(e, bool(i), bool(d), r, n) for e, i, d, r, n in conn.execute(sql, params)]

        return await self._read(query)

    async def pending_outbox(self) -> list[OutboundMessage]:
        """Messages still to send, in id order."""
        return await self._read(rows.select_outbox, "WHERE state = 'pending' ORDER BY id", [])

    async def dead_letters(self, limit: int = 100) -> list[OutboundMessage]:
        """Messages given up on, newest first."""
        return await self._read(rows.select_outbox, "WHERE state = 'dead' ORDER BY id DESC LIMIT ?", [limit])

    async def get_outbound(self, message_id: int) -> OutboundMessage | None:
        """The outbox message with this id, or None."""
        found = await self._read(rows.select_outbox, "WHERE id = ?", [message_id])
        return found[0] if found else None

    async def pending_inbound(self) -> list[StoredEvent]:
        """Events committed but not yet handled, in arrival (id) order."""
        return await self._read(rows.select_pending_inbound)

    async def get_overrides(self) -> dict[str, dict[str, Any]]:
        """scope -> runtime settings."""
        return await self._read(rows.select_overrides)
