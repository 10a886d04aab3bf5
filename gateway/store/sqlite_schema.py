"""The SQLite file itself: its process lock, connection pragmas and versioned schema.

- One process per database: an exclusive ``flock`` on ``<db>.lock``, which the kernel releases
  when the process dies, however it dies.
- WAL with ``synchronous=NORMAL``: a commit survives a crash (kill -9) of the process, not a
  power loss of the machine.
- The schema is ``MIGRATIONS``, applied in order on open; ``PRAGMA user_version`` says how many
  have been applied, so an existing database upgrades in place and a newer one is refused.

``run`` is the one way onto a connection's thread, for the writer and the reads alike.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar, cast

import aiosqlite

from gateway.errors import StoreError, StoreLocked

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
    # 2: how many parts of a split text the platform accepted, so that a retry, also after a
    # restart, sends only the rest (ChannelAdapter.send). Rows of version 1 start at 0.
    ["ALTER TABLE outbox ADD COLUMN parts_sent INTEGER NOT NULL DEFAULT 0"],
    # 3: a conversation's messages without scanning the outbox: the admin transcript and the
    # erasure of a contact (DELETE /admin/contacts/<id>). An insert adds one entry; sending
    # (a state change) leaves it alone.
    ["CREATE INDEX outbox_by_conversation ON outbox (endpoint, conversation, id)"],
    # 4: the web chat in public. Conversations the gateway issued, with the hash of their token
    # (a resume after a restart checks it); the inbox rows by conversation, for its history
    # (the outbox has its index since 3). The inbox rows carry the conversation only inside
    # their JSON payload, so that index is on the expression (the queries repeat it exactly;
    # nothing changes on the write path).
    [
        """CREATE TABLE conversation_secrets (
            endpoint TEXT NOT NULL, conversation TEXT NOT NULL, secret_hash TEXT NOT NULL,
            created_at REAL NOT NULL, PRIMARY KEY (endpoint, conversation))""",
        "CREATE INDEX conversation_secrets_by_age ON conversation_secrets (created_at)",
        "CREATE INDEX inbound_by_conversation ON inbound "
        "(endpoint, json_extract(payload, '$.conversation'), arrival_at)",
    ],
]

BUSY_TIMEOUT_MS = 5000

P = ParamSpec("P")
T = TypeVar("T")


async def run(
    conn: aiosqlite.Connection, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn(raw_connection, ...)`` on the connection's thread in ONE hop.

    aiosqlite offers no public call for "run this function on your thread"; its private
    ``_execute`` and ``_conn`` do exactly that, which is why pyproject pins aiosqlite <0.23.
    This and ``run_here`` are the only places that touch them. sqlite3 errors come back as ``StoreError``.
    """
    try:
        result = await conn._execute(fn, conn._conn, *args, **kwargs)  # type: ignore[no-untyped-call]
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc
    return cast(T, result)


def run_here(
    conn: aiosqlite.Connection, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run ``fn(raw_connection, ...)`` on the calling thread, as ``run`` does on the connection's.

    Only for a connection opened with ``check_same_thread=False`` whose own thread is idle: the
    writer's, between its hops (it never has two calls in flight). sqlite3 errors come back as
    ``StoreError``.
    """
    try:
        return fn(conn._conn, *args, **kwargs)
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite: {exc}") from exc


def take_lock(path: Path) -> int:
    """Create the directory, take the process lock on ``<path>.lock`` and write our pid into it.

    Returns the lock file's descriptor; closing it releases the lock.
    """
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


def release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def prepare_writer(conn: sqlite3.Connection) -> None:
    """Pragmas of the writing connection, then every migration the database lacks, each in its
    own transaction."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"cannot switch the database to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # the Checkpointer's job (sqlite_checkpoint.py)
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: the session indexes of a 1M-session run stay hot
    # Statement journals in memory: on disk, each was a temporary file opened, unlinked and
    # closed (five system calls) for the writer's multi-row statements.
    conn.execute("PRAGMA temp_store = MEMORY")
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


def prepare_checkpointer(conn: sqlite3.Connection) -> None:
    """Its checkpoints sync the file as the writer's own did (``synchronous=NORMAL``)."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")


def prepare_reader(conn: sqlite3.Connection) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")
