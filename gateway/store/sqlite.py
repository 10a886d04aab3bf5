"""The embedded SQLite store: group-committed writes on one connection, reads on another.

aiosqlite runs each connection's calls on its own thread, one at a time (DESIGN.md, known traps):

- Writes (``add_inbound``, ``commit``, overrides, prune) are queued to the group-commit writer
  (sqlite_writer.py): all that is queued commits as one transaction, a small batch on the event
  loop's thread, a bigger one on the writer thread in one hop; each write still fails alone.
- A third connection checkpoints the WAL, off the writer's path (sqlite_checkpoint.py).
- Reads use a second, ``query_only`` connection: admin, analytics and restore never wait behind
  a write batch. Each is one hop to the reader's thread, running a function of sqlite_reads.py
  or sqlite_conversation.py.
- The file (sqlite_schema.py): one process per database (an ``flock`` the kernel releases when
  the process dies), WAL with ``synchronous=NORMAL`` (a commit survives kill -9, not a power
  loss), and a versioned schema migrated in place on open.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from enum import Enum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from gateway.errors import StoreError
from gateway.models import (
    Change,
    Contact,
    InboundEvent,
    OutboundMessage,
    Session,
    StoredEvent,
    TranscriptEntry,
    TranscriptLine,
    contact_id_of,
)
from gateway.store import sqlite_conversation as conversation_reads
from gateway.store import sqlite_deletes as deletes
from gateway.store import sqlite_health as health
from gateway.store import sqlite_reads as reads
from gateway.store import sqlite_rows as rows
from gateway.store.base import SessionQuery, decode_cursor
from gateway.store.sqlite_checkpoint import Checkpointer
from gateway.store.sqlite_contact_reads import ContactReadBatcher
from gateway.store.sqlite_schema import (
    prepare_checkpointer,
    prepare_reader,
    prepare_writer,
    release_lock,
    run,
    take_lock,
)
from gateway.store.sqlite_writer import (
    AddSecret,
    ChangeRows,
    Exec,
    GroupCommitWriter,
    InboundRow,
    PartsSent,
    Probe,
    Prune,
    SetOverride,
    Work,
)

READ_CHUNK = 5000  # sessions per hop while streaming open_sessions
PROBE_TIMEOUT_S = 2.0  # check_writable's write
DELETE_CHUNK = 2000  # rows per write while pruning history: other writes interleave

P = ParamSpec("P")
T = TypeVar("T")


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
        self._writer_conn: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._writer: GroupCommitWriter | None = None
        self._checkpointer_conn: aiosqlite.Connection | None = None
        self.checkpointer: Checkpointer | None = None
        self._closing: asyncio.Future[None] | None = None
        self._contacts = ContactReadBatcher(lambda contact_ids: self._read(reads.select_contacts, contact_ids))
        self._identity: health.FileIdentity | None = None  # the file opened (gone? replaced?)

    def __repr__(self) -> str:
        return f"<SqliteStore {str(self._path)!r} {self._state.value} batches={self.batches_committed}>"

    @property
    def batches_committed(self) -> int:
        return 0 if self._writer is None else self._writer.batches_committed

    @property
    def ops_committed(self) -> int:
        return 0 if self._writer is None else self._writer.ops_committed

    async def open(self) -> None:
        """Take the process lock, connect writer and reader, apply migrations, start the writer.

        Raises ``StoreLocked`` when another process holds the database, ``StoreError`` otherwise.
        """
        if self._state is not _State.NEW:
            raise StoreError("store was opened already")
        self._state = _State.OPEN  # from here on aclose() has something to undo
        try:
            self._lock_fd = await asyncio.to_thread(take_lock, self._path)
            # Not tied to its thread: the writer commits small batches on the loop's (sqlite_writer.py).
            self._writer_conn = await self._connect(check_same_thread=False)
            await run(self._writer_conn, prepare_writer)
            self._reader = await self._connect()
            await run(self._reader, prepare_reader)
            self._checkpointer_conn = await self._connect()
            await run(self._checkpointer_conn, prepare_checkpointer)
            self._identity = await asyncio.to_thread(health.FileIdentity.of, self._path)
        except BaseException:
            await self.aclose()
            raise
        self._writer = GroupCommitWriter(self._writer_conn)
        self.checkpointer = Checkpointer(self._checkpointer_conn, self._writer)

    async def _connect(self, *, check_same_thread: bool = True) -> aiosqlite.Connection:
        try:
            # isolation_level=None: no implicit BEGIN; the writer issues BEGIN/COMMIT itself.
            return await aiosqlite.connect(self._path, isolation_level=None, check_same_thread=check_same_thread)
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
        try:
            if self.checkpointer is not None:
                await self.checkpointer.aclose()
            if self._writer is not None:  # it drains the queue, then returns
                await self._writer.stop()
            await self._contacts.wait_reads()
            # The writer's connection last: the last to close checkpoints the WAL and removes it.
            for conn in (self._checkpointer_conn, self._reader, self._writer_conn):
                if conn is not None:
                    await conn.close()
        finally:
            if self._lock_fd is not None:
                release_lock(self._lock_fd)
                self._lock_fd = None

    # -- writes ----------------------------------------------------------------------------------

    def _submit(self, work: Work, change: Change | None = None) -> asyncio.Future[Any]:
        if self._state is not _State.OPEN or self._writer is None:
            raise StoreError(f"store {self._path} is not open")
        return self._writer.submit(work, change)

    async def add_inbound(
        self, endpoint: str, event: InboundEvent, arrival_at: float, *, extends_to: float | None = None
    ) -> StoredEvent | None:
        """Commit ``event`` as pending; None when (endpoint, dedup_key) was seen before (a redelivery).

        ``extends_to`` is not stored: one process, so the session manager moves the deadline in
        memory at acceptance and commits it with the turn.
        """
        contact_id = contact_id_of(endpoint, event.conversation)
        work = InboundRow(endpoint, event.dedup_key, rows.event_to_json(event), arrival_at, contact_id)
        added: tuple[int, Contact | None] | None = await self._submit(work)
        if added is None:
            return None
        # The contact as of this commit: the message turn need not read it (StoredEvent).
        event_id, contact = added
        return StoredEvent(event_id, endpoint, arrival_at, event, contact=contact, contact_known=True)

    def commit(self, change: Change) -> Awaitable[None]:
        """Apply ``change`` atomically, group-committed with concurrent writes.

        The change is captured when called (later edits to its objects are not written) and is
        queued before this returns: what it returns is the writer's future, not a coroutine, so
        the write is applied even if nobody awaits it, and a caller that must not lose it needs
        no ``asyncio.shield`` task of its own (``Outbox._record``). New outbox messages get their
        ``id`` (for an existing key, the existing row's). A closed session is final: an open copy
        of it is ignored. Raises ``StoreError`` when this change fails; other writes are
        unaffected.
        """
        try:
            work = ChangeRows(
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
        return self._submit(work, change)

    async def record_parts_sent(self, message_id: int, parts_sent: int) -> None:
        """Set ``parts_sent`` of outbox message ``message_id`` and nothing else, group-committed.

        A narrow write: it cannot undo a concurrent update of the message's other columns.
        """
        await self._submit(PartsSent(message_id, parts_sent))

    async def add_conversation_secret(
        self, endpoint: str, conversation: str, secret_hash: str, created_at: float
    ) -> None:
        """Record an issued conversation and its secret's hash; StoreError if it exists already."""
        await self._submit(AddSecret(endpoint, conversation, secret_hash, created_at))

    async def put_override(self, scope: str, value: dict[str, Any]) -> None:
        """Store the runtime settings of ``scope``, replacing earlier ones."""
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store override {scope!r}: {exc}") from exc
        await self._submit(SetOverride(scope, text))

    async def delete_override(self, scope: str) -> None:
        """Drop the runtime settings of ``scope`` (no error when there are none)."""
        await self._submit(SetOverride(scope, None))

    async def check_writable(self, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """None when a write commits now; else why not (the file is gone or replaced, the disk
        is full, the probe write failed or took longer than ``timeout_s``)."""
        problem = await asyncio.to_thread(self._file_and_space_problem)
        if problem is not None:
            return problem
        try:
            async with asyncio.timeout(timeout_s):
                await self._submit(Probe())
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
        work = Prune(before, json.dumps(sorted(holding_channels)))
        total = 0
        while deleted := await self._submit(work):
            total += deleted
        return total

    async def delete_dead_letter(self, message_id: int) -> bool:
        """Delete outbox message ``message_id`` if it is a dead letter."""
        return bool(await self._submit(Exec(((deletes.DELETE_DEAD_LETTER, (message_id,)),))))

    async def erase_contact(self, endpoint: str, conversation: str) -> int:
        """Delete the contact, its sessions, its conversation's outbox messages and handled
        inbound events, in one transaction; the number of rows deleted."""
        deleted: int = await self._submit(Exec(deletes.erase_contact(endpoint, conversation)))
        return deleted

    async def prune_history(self, *, closed_sessions_before: float, messages_before: float) -> int:
        """Retention of closed sessions, contacts left without sessions, and sent or skipped
        messages. Candidates are found on the reader connection (a scan there never holds up
        a webhook's commit); each chunk is deleted by id on the writer, its condition checked
        again, so a row that changed meanwhile stays."""
        total = 0
        for select, delete, cutoff in (
            (deletes.OLD_CLOSED_SESSIONS, deletes.DELETE_CLOSED_SESSIONS, closed_sessions_before),
            (deletes.IDLE_CONTACTS, deletes.DELETE_IDLE_CONTACTS, closed_sessions_before),
            (deletes.OLD_DONE_OUTBOX, deletes.DELETE_DONE_OUTBOX, messages_before),
        ):
            after = ""  # contacts are paged by id; deleted sessions and messages leave the scan by themselves
            while ids := await self._read(reads.select_ids, select, (cutoff, after, DELETE_CHUNK)):
                deleted: int = await self._submit(Exec(((delete, (json.dumps(ids), cutoff)),)))
                total += deleted
                if len(ids) < DELETE_CHUNK or (deleted == 0 and select != deletes.IDLE_CONTACTS):
                    break  # the last chunk, or rows that changed under us: the next run sees them
                after = str(ids[-1])
        return total

    # -- reads -----------------------------------------------------------------------------------

    async def _read(self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._state is not _State.OPEN or self._reader is None:
            raise StoreError(f"store {self._path} is not open")
        return await run(self._reader, fn, *args, **kwargs)

    async def open_sessions(self) -> AsyncIterator[list[Session]]:
        """Every open session, by (endpoint, conversation), ``READ_CHUNK`` at a time through the
        partial index of open sessions."""
        chunk = await self._read(reads.select_open_sessions, None, READ_CHUNK)
        while chunk:
            # The next chunk is read while the caller takes this one (restore overlaps the two).
            ahead = None
            if len(chunk) == READ_CHUNK:
                last = (chunk[-1].endpoint, chunk[-1].conversation)
                ahead = asyncio.ensure_future(self._read(reads.select_open_sessions, last, READ_CHUNK))
            try:
                yield chunk
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)
                raise
            chunk = await ahead if ahead is not None else []

    async def get_session(self, session_id: str) -> Session | None:
        """The session with this id, or None."""
        return await self._read(reads.select_session, session_id)

    async def list_sessions(self, query: SessionQuery) -> tuple[list[Session], str | None]:
        """A page of sessions, newest first (started_at, then id), and the next page's cursor.

        Raises ValueError for a cursor this store did not produce.
        """
        after = None if query.cursor is None else decode_cursor(query.cursor)
        return await self._read(reads.select_session_page, query, after)

    async def get_contact(self, contact_id: str) -> Contact | None:
        """The contact with this id, or None.

        Every message turn reads its contact: the reads asked for during one loop iteration go
        to the reader thread as ONE query (``ContactReadBatcher``). Each caller gets its own object.
        """
        if self._state is not _State.OPEN or self._reader is None:
            raise StoreError(f"store {self._path} is not open")
        return await self._contacts.get(contact_id)

    async def get_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        """The contacts that exist among ``contact_ids``, by id, in one read."""
        return await self._read(reads.select_contacts, contact_ids) if contact_ids else {}

    async def contact_sessions(self, contact_id: str) -> list[Session]:
        """The contact's sessions (its conversation history, S6), newest first."""
        return await self._read(reads.select_contact_sessions, contact_id)

    async def session_analytics(
        self, since: float | None, until: float | None
    ) -> list[tuple[str, bool, bool, str | None, int]]:
        """Sessions started in ``[since, until)`` counted by (endpoint, interactive, developer,
        close_reason): one GROUP BY on the reader connection, over the ``sessions_by_start`` index."""
        return await self._read(reads.count_sessions, since, until)

    async def pending_outbox(self, *, skip_channels: Collection[str] = ()) -> list[OutboundMessage]:
        """Messages still to send, in id order, except those of ``skip_channels``."""
        return await self._read(reads.select_pending_outbox, sorted(skip_channels))

    async def pending_outbox_of(self, endpoint: str, conversation: str) -> list[OutboundMessage]:
        """One conversation's messages still to send, in id order (index outbox_by_conversation)."""
        return await self._read(reads.select_pending_outbox_of, endpoint, conversation)

    async def history(self, endpoint: str, conversation: str, since: float, limit: int) -> list[TranscriptLine]:
        """The conversation's user lines and sent messages from ``since`` on (see ``Store``)."""
        return await self._read(conversation_reads.select_history, endpoint, conversation, since, limit)

    async def conversation_secret(self, endpoint: str, conversation: str) -> str | None:
        """The secret hash of an issued conversation, or None."""
        return await self._read(reads.select_conversation_secret, endpoint, conversation)

    async def dead_letters(self, limit: int = 100) -> list[OutboundMessage]:
        """Messages given up on, newest first."""
        return await self._read(reads.select_dead_letters, limit)

    async def get_outbound(self, message_id: int) -> OutboundMessage | None:
        """The outbox message with this id, or None."""
        return await self._read(reads.select_outbound, message_id)

    async def count_dead_letters(self) -> int:
        """How many dead letters there are (one count over the ``outbox_by_state`` index)."""
        return await self._read(reads.count_dead_letters)

    async def transcript(
        self, endpoint: str, conversation: str, since: float, until: float, limit: int
    ) -> list[TranscriptEntry]:
        """The conversation's messages in ``[since, until]``, oldest first (the newest ``limit``)."""
        return await self._read(conversation_reads.select_transcript, endpoint, conversation, since, until, limit)

    async def pending_inbound(self) -> list[StoredEvent]:
        """Events committed but not yet handled, in arrival (id) order."""
        return await self._read(reads.select_pending_inbound)

    async def get_overrides(self) -> dict[str, dict[str, Any]]:
        """scope -> runtime settings."""
        return await self._read(reads.select_overrides)
