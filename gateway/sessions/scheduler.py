"""The per-conversation scheduler: one conversation's work one item at a time, in arrival order;
different conversations concurrently. It is the only owner of the conversation slots and of
their state (idle, working, held for a batch close).

Work arrives as items (``push``). Due sessions arrive from the timers (``expire``): when their
conversation is idle they are held and closed in batches, many sessions falling due together in
a few store commits, several batches in flight so that group commit overlaps them; when it is
busy the fire becomes an item in the conversation's own queue, behind the messages accepted
before it (DESIGN.md "The fire/message race").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager

from gateway.models import Session, StoredEvent
from gateway.sessions.state import Conversation, ExpireItem, SlotState, WorkItem

log = logging.getLogger("gateway.sessions")

CLOSE_BATCH = 500  # sessions closed per batch (group commit merges batches in flight)
CLOSE_BATCHES_IN_FLIGHT = 4

ItemHandler = Callable[[Conversation, WorkItem], Awaitable[None]]
FailureHandler = Callable[[Conversation, WorkItem, Exception], Awaitable[None]]
BatchHandler = Callable[[list[Conversation]], Awaitable[None]]


class ConversationScheduler:
    """Runs the work of each conversation in order. ``start`` and ``aclose`` bracket its life.

    ``handle`` runs one item; ``on_failure`` is told of an item whose handling raised (the
    conversation goes on with the next one); ``close_batch`` closes held conversations and
    hands each back with ``release``; ``on_forget`` hears of every slot dropped (a conversation
    with no session and no work).
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        *,
        handle: ItemHandler,
        on_failure: FailureHandler,
        close_batch: BatchHandler,
        on_forget: Callable[[Conversation], None] | None = None,
        own_budgets: Iterable[str] = (),
    ) -> None:
        self._handle = handle
        self._on_forget = on_forget
        self._on_failure = on_failure
        self._close_batch = close_batch
        self._conversations: dict[str, dict[str, Conversation]] = {name: {} for name in endpoints}
        self._workers: set[asyncio.Task[None]] = set()
        # Back-pressure budgets: the endpoints of ``own_budgets`` (web chat) each count their own
        # events; every other endpoint counts in the shared budget "" (the platforms' webhooks).
        # Per budget: accepted events not yet handled (the durable inbox's backlog), and events
        # between the back-pressure check and their inbox commit.
        self._own = frozenset(own_budgets)
        self._pending: dict[str, int] = dict.fromkeys(["", *self._own], 0)
        self._admitting: dict[str, int] = dict.fromkeys(["", *self._own], 0)
        self._due: list[Conversation] = []
        self._due_signal = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()
        self._closer: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._closer = asyncio.create_task(self._run_closer(), name="session-closer")

    async def aclose(self, *, timeout_s: float = 5.0) -> None:
        """Let workers finish the item in hand (bounded), then cancel workers and batches."""
        if self._workers:
            await asyncio.wait(list(self._workers), timeout=timeout_s)
        if self._closer is not None:
            self._closer.cancel()
            await asyncio.gather(self._closer, return_exceptions=True)
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    @property
    def busy(self) -> bool:
        """Some conversation has work queued or in hand, or a due batch waits or runs."""
        return bool(self._workers or self._due or self._batches)

    # -- back-pressure -----------------------------------------------------------------------

    def _budget(self, endpoint: str) -> str:
        return endpoint if endpoint in self._own else ""

    def backlog(self, endpoint: str) -> int:
        """Of the budget ``endpoint`` counts in: accepted events not yet handled, plus events on
        their way into the inbox."""
        budget = self._budget(endpoint)
        return self._pending[budget] + self._admitting[budget]

    @property
    def pending_events(self) -> int:
        """Accepted events not yet handled, all budgets together."""
        return sum(self._pending.values())

    @contextmanager
    def admitting(self, endpoint: str) -> Iterator[None]:
        """Count an event from the back-pressure check to its inbox commit: concurrent webhooks
        all wait on one group commit, and each must see the others it is racing with."""
        budget = self._budget(endpoint)
        self._admitting[budget] += 1
        try:
            yield
        finally:
            self._admitting[budget] -= 1

    # -- slots -------------------------------------------------------------------------------

    def slot(self, endpoint: str, conversation: str) -> Conversation:
        """The conversation's slot, created when it has none."""
        by_conversation = self._conversations.get(endpoint)
        if by_conversation is None:
            by_conversation = self._conversations[endpoint] = {}
        slot = by_conversation.get(conversation)
        if slot is None:
            slot = by_conversation[conversation] = Conversation(endpoint, conversation)
        return slot

    def restored_slots(self, endpoint: str, conversations: list[str]) -> list[Conversation]:
        """The slots of ``conversations`` of ``endpoint``, new ones created (restore: one
        dictionary lookup each where ``slot`` takes two)."""
        add = self._conversations.setdefault(endpoint, {}).setdefault
        return [add(conversation, Conversation(endpoint, conversation)) for conversation in conversations]

    def find(self, endpoint: str, conversation: str) -> Conversation | None:
        return self._conversations.get(endpoint, {}).get(conversation)

    def slots(self, endpoint: str | None = None) -> list[Conversation]:
        """A snapshot of the slots of one endpoint, or of all."""
        if endpoint is not None:
            return list(self._conversations.get(endpoint, {}).values())
        return [slot for by_conversation in self._conversations.values() for slot in by_conversation.values()]

    @staticmethod
    def runs_next(slot: Conversation) -> bool:
        """An item pushed now is the conversation's next one: nothing is queued or in hand."""
        return slot.state == SlotState.IDLE and not slot.queue

    @staticmethod
    def is_held(slot: Conversation) -> bool:
        """Held by the batch closer (its session is being closed)."""
        return slot.state == SlotState.CLOSING

    # -- work --------------------------------------------------------------------------------

    def push(self, slot: Conversation, item: WorkItem) -> None:
        """Queue ``item`` behind the conversation's other work."""
        if isinstance(item, StoredEvent):
            self._pending[self._budget(item.endpoint)] += 1
        if slot.queue is None:
            slot.queue = deque()
        slot.queue.append(item)
        if slot.state == SlotState.IDLE:
            self._start_worker(slot)

    def expire(self, slot: Conversation, session: Session) -> None:
        """The session's timer found it due: hold an idle conversation for a batch close, or
        queue the fire behind a busy conversation's work."""
        if slot.state == SlotState.IDLE:
            slot.state = SlotState.CLOSING
            self._due.append(slot)
            self._due_signal.set()
        else:
            self.push(slot, ExpireItem(session.id))

    def release(self, slot: Conversation) -> None:
        """Hand a conversation held by the batch closer back: run what queued meanwhile."""
        slot.state = SlotState.IDLE
        if slot.queue:
            self._start_worker(slot)
        else:
            self.forget_if_empty(slot)

    def forget_if_empty(self, slot: Conversation) -> None:
        """Drop the slot of a conversation with no open session and no work."""
        if slot.session is None and slot.state == SlotState.IDLE and not slot.queue:
            by_conversation = self._conversations.get(slot.endpoint)
            if by_conversation is not None and by_conversation.get(slot.conversation) is slot:
                del by_conversation[slot.conversation]
                if self._on_forget is not None:
                    self._on_forget(slot)

    def discard_work(self, slot: Conversation) -> list[WorkItem]:
        """Take the conversation's queued work away (another instance owns it now); returns it.
        Events among it stay pending in the store for the new owner."""
        items = list(slot.queue or ())
        if slot.queue:
            slot.queue.clear()
        self._pending[self._budget(slot.endpoint)] -= sum(1 for item in items if isinstance(item, StoredEvent))
        return items

    def _start_worker(self, slot: Conversation) -> None:
        slot.state = SlotState.WORKING
        task = asyncio.create_task(self._work(slot))
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    async def _work(self, slot: Conversation) -> None:
        try:
            while slot.queue:
                item = slot.queue.popleft()
                try:
                    await self._handle(slot, item)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one bad item must not stop the conversation
                    log.exception("failed to handle %s on %s/%s", type(item).__name__, slot.endpoint, slot.conversation)
                    if isinstance(item, StoredEvent):
                        self._pending[self._budget(item.endpoint)] -= 1
                    await self._on_failure(slot, item, exc)
                else:
                    if isinstance(item, StoredEvent):
                        self._pending[self._budget(item.endpoint)] -= 1
        finally:
            slot.state = SlotState.IDLE
            slot.queue = None
            self.forget_if_empty(slot)

    # -- batch closes ------------------------------------------------------------------------

    async def _run_closer(self) -> None:
        in_flight = asyncio.Semaphore(CLOSE_BATCHES_IN_FLIGHT)
        try:
            while True:
                await self._due_signal.wait()
                self._due_signal.clear()
                while self._due:
                    await in_flight.acquire()
                    batch, self._due = self._due[:CLOSE_BATCH], self._due[CLOSE_BATCH:]
                    task = asyncio.create_task(self._run_batch(batch))
                    self._batches.add(task)
                    task.add_done_callback(self._batches.discard)
                    task.add_done_callback(lambda _done: in_flight.release())
        finally:
            batches = list(self._batches)
            for task in batches:
                task.cancel()
            await asyncio.gather(*batches, return_exceptions=True)

    async def _run_batch(self, batch: list[Conversation]) -> None:
        try:
            await self._close_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("closing %d due sessions failed; each is retried on its own", len(batch))
            for slot in batch:
                if slot.state == SlotState.CLOSING:
                    slot.state = SlotState.IDLE
                    if slot.session is not None:
                        self.push(slot, ExpireItem(slot.session.id))
