"""WAL checkpoints off the writer's path.

SQLite checkpoints automatically in the connection that commits, right after its commit: every
~1,000 pages of WAL the writer copied them back into the database file and synced it, and the
writes queued meanwhile waited. bench/delivery.py (500 webhooks/s) answered webhooks p99 8.0-8.6
ms with that, 4.9-6.4 ms without. So the writer's connection has ``wal_autocheckpoint`` off, and
``Checkpointer`` checkpoints from a connection and thread of its own, twice a second when
something was written. Its checkpoints are PASSIVE: they never wait for the writer, nor it for
them.

A passive checkpoint copies what was committed when it began. SQLite starts the WAL over at the
beginning of a write only when every frame in it has been copied, which a writer that never
pauses does not allow: so when the WAL holds more than ``wal_limit_pages`` after a checkpoint,
the writer checkpoints once itself between two batches (``Checkpoint`` work), as the automatic
checkpoint did, and the file is reused from its start.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import aiosqlite

from gateway.errors import StoreError
from gateway.store.sqlite_schema import run
from gateway.store.sqlite_writer import Checkpoint, GroupCommitWriter

log = logging.getLogger("gateway.store")

EVERY_S = 0.5
WAL_LIMIT_PAGES = 16_384  # 64 MiB of 4 KiB pages


def passive_checkpoint(conn: sqlite3.Connection) -> int:
    """Checkpoint what it can without waiting; the frames in the WAL (copied or not: SQLite
    reuses the file from its start only once a writer finds every frame copied)."""
    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(frames)


class Checkpointer:
    """Checkpoints the WAL of ``writer``'s database on ``conn`` (a connection of its own).

    ``checkpoints`` counts the checkpoints it ran, ``writer_checkpoints`` those it asked the
    writer for (the WAL had grown past ``wal_limit_pages``).
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        writer: GroupCommitWriter,
        *,
        every_s: float | None = None,
        wal_limit_pages: int | None = None,
    ) -> None:
        self._conn = conn
        self._writer = writer
        self._every_s = EVERY_S if every_s is None else every_s
        self._wal_limit_pages = WAL_LIMIT_PAGES if wal_limit_pages is None else wal_limit_pages
        self._seen_batches = 0
        self.checkpoints = 0
        self.writer_checkpoints = 0
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sqlite-checkpointer")

    async def aclose(self) -> None:
        """Stop checkpointing once the checkpoint in hand is done (the last connection to close
        checkpoints what is left). Idempotent."""
        self._stop.set()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self._every_s)
                return
            except TimeoutError:
                pass
            if self._writer.batches_committed == self._seen_batches:
                continue  # nothing written since the last look
            self._seen_batches = self._writer.batches_committed
            try:
                frames = await run(self._conn, passive_checkpoint)
            except StoreError as exc:  # the writer's own writes are unaffected; try again later
                log.warning("WAL checkpoint failed: %s", exc)
                continue
            self.checkpoints += 1
            if frames > self._wal_limit_pages:
                self.writer_checkpoints += 1
                try:
                    await self._writer.submit(Checkpoint())
                except StoreError as exc:
                    log.warning("WAL checkpoint by the writer failed: %s", exc)
