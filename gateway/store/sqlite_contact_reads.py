"""``SqliteStore.get_contact`` in batches: every message turn reads its contact, and the reads
asked for during one loop iteration go to the reader thread as ONE query (a thread hop per
message was ~5% of the gateway's time under load, bench/ingest.py)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable

from gateway.errors import StoreError
from gateway.models import Contact

ReadContacts = Callable[[list[str]], Awaitable[dict[str, Contact]]]
_Waiting = list[tuple[str, asyncio.Future[Contact | None]]]


class ContactReadBatcher:
    """Answers ``get`` with one ``read`` (the contacts that exist among some ids) for all the
    calls made until the loop next runs its callbacks. Each caller gets its own object."""

    def __init__(self, read: ReadContacts) -> None:
        self._read = read
        self._waiting: _Waiting = []
        self._tasks: set[asyncio.Future[None]] = set()

    async def get(self, contact_id: str) -> Contact | None:
        """The contact with this id, or None; ``StoreError`` when the batch's read fails."""
        future: asyncio.Future[Contact | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((contact_id, future))
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._start)
        return await future

    async def wait_reads(self) -> None:
        """Wait until the reads in flight have answered (before the connection closes)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self) -> None:
        waiting, self._waiting = self._waiting, []
        task = asyncio.ensure_future(self._answer(waiting))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, waiting: _Waiting) -> None:
        try:
            found = await self._read(list({contact_id for contact_id, _ in waiting}))
        except Exception as exc:
            for _, future in waiting:
                if not future.done():  # each caller its own exception instance
                    error = StoreError(f"cannot read contact: {exc}")
                    error.__cause__ = exc
                    future.set_exception(error)
            return
        handed: set[str] = set()
        for contact_id, future in waiting:
            if future.done():  # the caller stopped waiting
                continue
            contact = found.get(contact_id)
            if contact is not None and contact_id in handed:
                contact = copy.deepcopy(contact)  # callers change their contact: never share one
            handed.add(contact_id)
            future.set_result(contact)
