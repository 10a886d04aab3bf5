"""The session manager: one open session per conversation, each with its own inactivity timer.

Data flows one way: ``accept`` (called by the web layer once the event is parsed) commits the
event to the durable inbox, moves the session's deadline at once, and queues the event on its
conversation. One worker per busy conversation handles that conversation's items one at a time
(per-session ordering); different conversations run concurrently.

Timers live in ``gateway.expiry`` (one lazily re-armed handle per open session); the pure rules
of a close (what is cleared, which notice) in ``gateway.session_rules``.

The fire/message race: the fire is an item in the conversation's own queue (or, when the
conversation is idle, a batch close that holds the conversation meanwhile), and every close
re-checks the deadline first. So either a message accepted before the close moved the deadline
and the session lives on, or the session closes and the message opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable

from gateway.close_scripts import CloseScripts
from gateway.errors import Overloaded, SessionNotFound, SessionNotOpen
from gateway.expiry import ExpiryTimers
from gateway.flows import Flow, FlowResult, FlowTurn
from gateway.metrics import Metrics
from gateway.models import (
    Change,
    CloseReason,
    Contact,
    EventKind,
    InboundEvent,
    MessageKind,
    OutboundMessage,
    Session,
    StoredEvent,
    contact_id_of,
)
from gateway.policy import EndpointPolicy
from gateway.session_rules import (
    NOTICE_QUEUED,
    ClosureTexts,
    apply_discard,
    apply_flow_result,
    clear_auth_profiles,
    clear_ttl_variables,
    clears_auth_profiles,
    close_session,
    discard_command,
    live_ttl_variables,
    notice_decision,
)
from gateway.session_types import (
    BotMessageItem,
    ClearProfilesItem,
    CloseItem,
    Conversation,
    ExpireItem,
    ManagerStats,
    OutboxSink,
    SlotState,
    WorkItem,
)
from gateway.settings import SessionMode
from gateway.store.base import Store
from gateway.wire import session_json

# The manager's public names, including the types callers catch or implement.
__all__ = ["OutboxSink", "SessionManager"]

log = logging.getLogger("gateway.sessions")

_RESTORE_YIELD_EVERY = 5000  # restore arms this many timers between yields to the loop


class SessionManager:
    """Owns the open sessions and their timers. ``start`` restores; ``aclose`` stops."""

    def __init__(
        self,
        store: Store,
        flow: Flow,
        outbox: OutboxSink,
        policies: dict[str, EndpointPolicy],
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        error_reply: str | None = None,
        max_pending_events: int = 10_000,
        scripts: CloseScripts | None = None,
    ) -> None:
        self._store = store
        self._flow = flow
        self._outbox = outbox
        self._policies = dict(policies)
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._error_reply = error_reply
        self._max_pending = max_pending_events
        self._scripts = scripts
        self._script_tasks: set[asyncio.Task[None]] = set()
        self._pending = 0  # accepted events not yet handled (the durable inbox's backlog)
        self._admitting = 0  # events between the back-pressure check and their inbox commit
        self._conversations: dict[str, dict[str, Conversation]] = {name: {} for name in policies}
        self._workers: set[asyncio.Task[None]] = set()
        self._texts = ClosureTexts()
        self._open_count = 0
        self._closing = False
        self.ready = False
        self.stats = ManagerStats()
        self.listeners: list[Callable[[Session], None]] = []
        self._timers = ExpiryTimers(
            clock, self.stats, close_batch=self._close_batch, on_busy=lambda slot, s: self._push(slot, ExpireItem(s.id))
        )
        self._metrics.gauge("gateway_open_sessions", lambda: float(self._open_count))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore: load open sessions, re-queue pending inbound events (they move deadlines),
        then arm every timer; sessions overdue since before the restart close at once."""
        self._timers.start()
        removed: list[Session] = []
        loaded = 0
        async for session in self._store.open_sessions():
            policy = self._policies.get(session.endpoint)
            if policy is None:
                removed.append(session)
                continue
            # Deadlines derive from the current policy: a setting changed while we were down
            # applies to the restored sessions too.
            session.expires_at = policy.deadline(session.last_activity_at)
            self._slot(session.endpoint, session.conversation).session = session
            self._open_count += 1
            loaded += 1
            if loaded % _RESTORE_YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await self._close_removed(removed)
        for stored in await self._store.pending_inbound():
            self._enqueue(stored)
        armed = 0
        for by_conversation in self._conversations.values():
            for slot in list(by_conversation.values()):
                if slot.session is not None and slot.handle is None:
                    self._arm(slot)
                    armed += 1
                    if armed % _RESTORE_YIELD_EVERY == 0:
                        await asyncio.sleep(0)
        self.ready = True
        log.info("restored %d open sessions, %d pending events re-queued", loaded, self.pending_events)

    async def aclose(self) -> None:
        """Stop taking work, let workers finish the item in hand, cancel timers. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self.ready = False
        for by_conversation in self._conversations.values():
            for slot in by_conversation.values():
                self._timers.disarm(slot)
        if self._workers:
            await asyncio.wait(list(self._workers), timeout=5.0)
        await self._timers.aclose()
        tasks = [*self._workers, *self._script_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def open_count(self) -> int:
        return self._open_count

    @property
    def pending_events(self) -> int:
        """Accepted events not yet handled."""
        return self._pending

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until no conversation has work queued or in hand (for tests and benchmarks)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._workers or not self._timers.idle:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("session manager did not drain")
            await asyncio.sleep(0.005)

    # -- inbound -----------------------------------------------------------------------------

    async def accept(self, endpoint: str, event: InboundEvent, arrival_at: float | None = None) -> bool:
        """Commit ``event`` durably and queue it; False when it is a redelivery (seen before).

        Returns once the event is in the inbox, so the caller may answer 2xx. The deadline of
        the conversation's open session moves now, not when a worker gets to the event.
        """
        if self._closing:
            raise Overloaded("gateway is shutting down")
        # Counted from the check on: concurrent webhooks all wait on one group commit, and
        # each must see the others it is racing with, or a burst slips past the bound.
        if self._pending + self._admitting >= self._max_pending:
            # The backlog waits on disk, but unbounded it would only grow: say "later" (503).
            self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="overloaded")
            raise Overloaded(f"{self._pending} events wait to be handled; try again later")
        arrival = self._clock() if arrival_at is None else arrival_at
        self._admitting += 1
        try:
            stored = await self._store.add_inbound(endpoint, event, arrival)
        finally:
            self._admitting -= 1  # nothing awaits from here to _enqueue: _pending takes over
        if stored is None:
            self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="duplicate")
            return False
        self._metrics.inc("gateway_events_total", endpoint=endpoint, outcome="accepted")
        log.info(
            "event in: endpoint=%s conversation=%s kind=%s id=%s", endpoint, event.conversation, event.kind, stored.id
        )
        self._enqueue(stored)
        return True

    def _enqueue(self, stored: StoredEvent) -> None:
        slot = self._slot(stored.endpoint, stored.event.conversation)
        session = slot.session
        policy = self._policies.get(stored.endpoint)
        if (
            stored.event.is_interaction
            and session is not None
            and policy is not None
            and slot.state != SlotState.CLOSING
            and session.expires_at is not None
            and session.expires_at > stored.arrival_at
        ):
            # Move the deadline at acceptance (lazy re-arm: the handle re-arms when it fires).
            session.expires_at = max(session.expires_at, policy.deadline(stored.arrival_at) or 0.0)
        self._push(slot, stored)

    def _slot(self, endpoint: str, conversation: str) -> Conversation:
        by_conversation = self._conversations.setdefault(endpoint, {})
        slot = by_conversation.get(conversation)
        if slot is None:
            slot = by_conversation[conversation] = Conversation(endpoint, conversation)
        return slot

    def _push(self, slot: Conversation, item: WorkItem) -> None:
        if isinstance(item, StoredEvent):
            self._pending += 1
        if slot.queue is None:
            slot.queue = deque()
        slot.queue.append(item)
        if slot.state == SlotState.IDLE:
            self._start_worker(slot)

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
                    if isinstance(item, StoredEvent):
                        self._pending -= 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # one bad item must not stop the conversation
                    log.exception("failed to handle %s on %s/%s", type(item).__name__, slot.endpoint, slot.conversation)
                    if isinstance(item, CloseItem | BotMessageItem) and not item.done.done():
                        item.done.set_exception(exc)
                    if isinstance(item, StoredEvent):
                        self._pending -= 1
                        await self._give_up_on(item)
        finally:
            slot.state = SlotState.IDLE
            slot.queue = None
            self._forget_if_empty(slot)

    def _forget_if_empty(self, slot: Conversation) -> None:
        if slot.session is None and slot.state == SlotState.IDLE and not slot.queue:
            by_conversation = self._conversations.get(slot.endpoint)
            if by_conversation is not None and by_conversation.get(slot.conversation) is slot:
                del by_conversation[slot.conversation]

    async def _handle(self, slot: Conversation, item: WorkItem) -> None:
        if isinstance(item, StoredEvent):
            await self._handle_event(slot, item)
        elif isinstance(item, ExpireItem):
            await self._handle_expire(slot, item)
        elif isinstance(item, CloseItem):
            await self._handle_close(slot, item)
        elif isinstance(item, BotMessageItem):
            await self._handle_bot_message(slot, item)
        else:
            await self._handle_clear_profiles(slot, item)

    # -- events ------------------------------------------------------------------------------

    async def _handle_event(self, slot: Conversation, stored: StoredEvent) -> None:
        event = stored.event
        policy = self._policies.get(stored.endpoint)
        change = Change(handled_events=[stored.id])
        if policy is None:  # endpoint removed while the event waited: nothing to answer with
            await self._store.commit(change)
            return
        contact = await self._contact(stored.endpoint, event.conversation)
        now = self._clock()
        closed: list[Session] = []
        if event.kind is EventKind.REFRESH:
            if slot.session is not None:
                closed.append(self._close_into(change, slot.session, CloseReason.REFRESH, False, contact, policy, now))
            clear_ttl_variables(contact)  # S17: everything goes, TTL variables too
            clear_auth_profiles(contact)
            _include(change, contact)
            await self._commit(slot, change, closed=closed)
            return
        if event.kind in (EventKind.OPT_OUT, EventKind.OPT_IN):
            contact.opted_out = event.kind is EventKind.OPT_OUT
            change.contacts.append(contact)
            await self._store.commit(change)
            log.info("contact %s opted %s", contact.id, "out" if contact.opted_out else "in")
            return

        session = slot.session
        after_expiry = False
        result: FlowResult | None = None
        if session is not None and session.expires_at is not None and session.expires_at <= stored.arrival_at:
            if policy.mode is SessionMode.LAZY and session.intent is not None:
                # S8: the flow judges whether the returning user carries on the same intent.
                after_expiry = True
                result = await self._call_flow(session, contact, event, after_expiry=True, now=now)
                if result.intent != session.intent:
                    # A new intent: the old session ends silently and the message is handled
                    # again, in the new session (the flow sees it twice; message_id tells).
                    closed.append(
                        self._close_into(change, session, CloseReason.INACTIVITY, False, contact, policy, now)
                    )
                    session = None
                    after_expiry = False
                    result = None
            else:
                # Lazy mode never sends a notice: nothing happened at the deadline (S8).
                notify = policy.mode is SessionMode.PROACTIVE and policy.on_close.notify
                closed.append(self._close_into(change, session, CloseReason.INACTIVITY, notify, contact, policy, now))
                session = None
        opened = session is None
        if session is None:
            session = self._new_session(policy, event.conversation, stored.arrival_at, interactive=True)
        session.interactive = True  # S13: the first user message makes a session interactive
        session.message_count += 1
        session.last_activity_at = max(session.last_activity_at, stored.arrival_at)
        deadline = policy.deadline(stored.arrival_at)
        if deadline is not None and (session.expires_at is None or deadline > session.expires_at):
            session.expires_at = deadline
        contact.last_user_message_at = max(contact.last_user_message_at or 0.0, stored.arrival_at)
        if event.sender_name:
            contact.display_name = event.sender_name
        command = discard_command(event.text, policy) if event.kind is EventKind.MESSAGE else None
        if command is not None:
            # S18: the gateway stops the dialog itself; the session stays open, no flow call.
            apply_discard(session, command)
            reply = policy.discard.all_reply if command == "discard all" else policy.discard.reply
            result = FlowResult(replies=[reply] if reply else [])
        if result is None:
            result = await self._call_flow(session, contact, event, after_expiry=after_expiry, now=now)
        apply_flow_result(session, contact, result, now)
        for n, text in enumerate(result.replies):
            change.outbox.append(self._message(session, MessageKind.REPLY, text, f"reply:{stored.id}:{n}", event))
        change.sessions.append(session)
        _include(change, contact)
        if result.end_session:
            notify = policy.on_close.notify
            closed.append(
                self._close_into(change, session, CloseReason.FLOW, notify, contact, policy, now, in_change=True)
            )
        await self._commit(slot, change, opened=session if opened else None, closed=closed)

    async def _give_up_on(self, stored: StoredEvent) -> None:
        """An event whose handling raised unexpectedly (a bug, not a flow failure) is marked
        handled, so it does not fail again at every restart; it stays in the inbox table."""
        self._metrics.inc("gateway_event_errors_total", endpoint=stored.endpoint)
        try:
            await self._store.commit(Change(handled_events=[stored.id]))
        except Exception:
            log.exception("could not mark failed event %d handled; it will be retried at restart", stored.id)

    async def _call_flow(
        self, session: Session, contact: Contact, event: InboundEvent, *, after_expiry: bool, now: float
    ) -> FlowResult:
        turn = FlowTurn(session, event, live_ttl_variables(contact, now), dict(contact.auth_profiles), after_expiry)
        try:
            return await self._flow.handle(turn)
        except Exception as exc:  # any flow failure is counted and survived, never a lost event
            self._metrics.inc("gateway_flow_errors_total", endpoint=session.endpoint)
            log.warning("flow failed for session %s: %s", session.id, exc)
            return FlowResult(replies=[self._error_reply] if self._error_reply else [])

    async def _contact(self, endpoint: str, conversation: str) -> Contact:
        contact_id = contact_id_of(endpoint, conversation)
        contact = await self._store.get_contact(contact_id)
        if contact is None:
            contact = Contact(id=contact_id, endpoint=endpoint, conversation=conversation, created_at=self._clock())
        return contact

    def _new_session(self, policy: EndpointPolicy, conversation: str, at: float, *, interactive: bool) -> Session:
        return Session(
            id=uuid.uuid4().hex,
            endpoint=policy.endpoint,
            channel=policy.channel,
            conversation=conversation,
            started_at=at,
            last_activity_at=at,
            expires_at=policy.deadline(at),
            interactive=interactive,
            developer=policy.developer,  # S14
        )

    def _message(
        self, session: Session, kind: MessageKind, text: str, key: str, event: InboundEvent | None = None
    ) -> OutboundMessage:
        return OutboundMessage(
            endpoint=session.endpoint,
            channel=session.channel,
            conversation=session.conversation,
            kind=kind,
            text=text,
            key=key,
            created_at=self._clock(),
            session_id=session.id,
            reply_token=event.reply_token if event else None,
            reply_token_expires_at=event.reply_token_expires_at if event else None,
            user_last_seen_at=session.last_activity_at if session.interactive else None,
        )

    # -- closing -----------------------------------------------------------------------------

    def _close_into(
        self,
        change: Change,
        session: Session,
        reason: CloseReason,
        notify: bool,
        contact: Contact | None,
        policy: EndpointPolicy | None,
        now: float,
        *,
        in_change: bool = False,
    ) -> Session:
        """Close ``session`` inside ``change``, with its closure notice when one is due.
        ``in_change``: the session is already among ``change.sessions``."""
        session.notice = notice_decision(session, reason, notify, contact)
        text = self._texts.pick(policy, contact) if policy is not None and session.notice == NOTICE_QUEUED else None
        if session.notice == NOTICE_QUEUED and text is None:
            session.notice = "none"
        if text is not None:
            change.outbox.append(self._message(session, MessageKind.CLOSURE, text, f"close:{session.id}"))
        close_session(session, reason, now)
        if contact is not None and clears_auth_profiles(reason, policy) and clear_auth_profiles(contact):
            _include(change, contact)
        if not in_change:
            change.sessions.append(session)
        return session

    async def _commit(
        self, slot: Conversation, change: Change, *, opened: Session | None = None, closed: Iterable[Session] = ()
    ) -> None:
        await self._store.commit(change)
        for session in closed:
            self._after_close(slot, session)
        if opened is not None and opened.is_open:
            slot.session = opened
            self._open_count += 1
            self._metrics.inc("gateway_sessions_opened_total", endpoint=opened.endpoint)
            log.info(
                "session opened: %s endpoint=%s conversation=%s interactive=%s developer=%s",
                opened.id,
                opened.endpoint,
                opened.conversation,
                opened.interactive,
                opened.developer,
            )
            self._arm(slot)
            self._notify(opened)
        for message in change.outbox:
            log.info(
                "message out queued: endpoint=%s conversation=%s kind=%s",
                message.endpoint,
                message.conversation,
                message.kind,
            )
        self._outbox.submit(change.outbox)

    def _after_close(self, slot: Conversation, session: Session) -> None:
        if slot.session is session:
            slot.session = None
            self._timers.disarm(slot)
            self._open_count -= 1
        self._metrics.inc("gateway_sessions_closed_total", endpoint=session.endpoint, reason=str(session.close_reason))
        self.stats.closes_committed += 1
        if self.stats.record_lags and session.close_reason is CloseReason.INACTIVITY and session.expires_at:
            self.stats.close_lags_s.append(self._clock() - session.expires_at)
        log.info("session closed: %s reason=%s notice=%s", session.id, session.close_reason, session.notice)
        self._notify(session)
        policy = self._policies.get(session.endpoint)
        if self._scripts is not None and policy is not None and policy.on_close.script:
            task = asyncio.create_task(self._run_close_script(session, policy.on_close.script, policy))
            self._script_tasks.add(task)
            task.add_done_callback(self._script_tasks.discard)

    async def _run_close_script(self, session: Session, ref: str, policy: EndpointPolicy) -> None:
        """S12, after the close committed: never delays or undoes the close."""
        assert self._scripts is not None
        try:
            contact = await self._store.get_contact(session.contact_id)
            profiles = sorted(contact.auth_profiles) if contact is not None else []
            timeout_s = policy.on_close.script_timeout_seconds
            names = await self._scripts.run(ref, timeout_s, session_json(session), profiles)
        except Exception as exc:
            self._metrics.inc("gateway_close_script_errors_total", endpoint=session.endpoint)
            log.warning("close script for session %s failed: %s", session.id, exc)
            return
        log.info("close script ran for session %s; auth profiles to clear: %s", session.id, names or "none")
        if names and not self._closing:
            # Through the conversation's queue: a turn of the next session must not race it.
            self._push(self._slot(session.endpoint, session.conversation), ClearProfilesItem(names))

    async def _handle_clear_profiles(self, slot: Conversation, item: ClearProfilesItem) -> None:
        contact = await self._store.get_contact(contact_id_of(slot.endpoint, slot.conversation))
        if contact is not None and clear_auth_profiles(contact, item.names):
            await self._store.commit(Change(contacts=[contact]))

    def _notify(self, session: Session) -> None:
        for listener in self.listeners:
            try:
                listener(session)
            except Exception:
                log.exception("session listener failed")

    async def _handle_expire(self, slot: Conversation, item: ExpireItem) -> None:
        session = slot.session
        if session is None or session.id != item.session_id:
            return  # closed meanwhile (refresh, flow, admin): nothing to do
        if not self._timers.is_due(session):
            self._arm(slot)  # a message moved the deadline while the fire waited in the queue
            return
        policy = self._policies.get(session.endpoint)
        await self._close_now(slot, session, CloseReason.INACTIVITY, policy is not None and policy.on_close.notify)

    async def _handle_close(self, slot: Conversation, item: CloseItem) -> None:
        session = slot.session
        if session is None or session.id != item.session_id:
            item.done.set_exception(SessionNotOpen(item.session_id))
            return
        await self._close_now(slot, session, item.reason, item.notify)
        item.done.set_result(session)

    async def _close_now(self, slot: Conversation, session: Session, reason: CloseReason, notify: bool) -> None:
        """Close one session in its own commit (from the conversation's queue)."""
        contact = await self._store.get_contact(session.contact_id)
        change = Change()
        policy = self._policies.get(session.endpoint)
        self._close_into(change, session, reason, notify, contact, policy, self._clock())
        await self._commit(slot, change, closed=[session])

    async def _close_removed(self, sessions: list[Session]) -> None:
        """Close sessions of endpoints no longer configured (reason ``endpoint_removed``)."""
        now = self._clock()
        for start in range(0, len(sessions), _RESTORE_YIELD_EVERY):
            change = Change()
            for session in sessions[start : start + _RESTORE_YIELD_EVERY]:
                self._close_into(change, session, CloseReason.ENDPOINT_REMOVED, False, None, None, now)
            await self._store.commit(change)
            for session in change.sessions:
                log.info(
                    "session closed: %s reason=endpoint_removed (endpoint %s is gone)", session.id, session.endpoint
                )
                self._metrics.inc("gateway_sessions_closed_total", endpoint=session.endpoint, reason="endpoint_removed")

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, slot: Conversation) -> None:
        policy = self._policies.get(slot.endpoint)
        if policy is None or policy.mode is SessionMode.LAZY:
            return  # lazy (S8): nothing happens at the deadline
        self._timers.arm(slot)  # no-op for a session that never expires (S3)

    async def _close_batch(self, batch: list[Conversation]) -> None:
        try:
            await self._close_due(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("closing %d due sessions failed; each is retried on its own", len(batch))
            for slot in batch:
                if slot.state == SlotState.CLOSING:
                    slot.state = SlotState.IDLE
                    if slot.session is not None:
                        self._push(slot, ExpireItem(slot.session.id))

    async def _close_due(self, batch: list[Conversation]) -> None:
        closing: list[Conversation] = []
        for slot in batch:
            if slot.session is not None and self._timers.is_due(slot.session):
                closing.append(slot)
            else:  # a message moved the deadline since the fire
                self._release(slot)
                self._arm(slot)
        if not closing:
            return
        # Contacts matter only where a notice may go out (an opted-out contact gets none) or
        # auth profiles are to be cleared; mass expiry of silent endpoints reads none.
        wanted = [slot.session.contact_id for slot in closing if slot.session and self._needs_contact(slot.session)]
        contacts = await self._store.get_contacts(wanted) if wanted else {}
        change = Change()
        now = self._clock()
        for slot in closing:
            assert slot.session is not None  # checked above; for the type checker only
            policy = self._policies.get(slot.endpoint)
            notify = policy is not None and policy.on_close.notify
            contact = contacts.get(slot.session.contact_id)
            self._close_into(change, slot.session, CloseReason.INACTIVITY, notify, contact, policy, now, in_change=True)
            change.closes.append(slot.session)  # nothing else changed since its last commit
        await self._store.commit(change)
        for slot, session in zip(closing, change.closes, strict=True):
            self._after_close(slot, session)
            self._release(slot)
        self._outbox.submit(change.outbox)

    def _needs_contact(self, session: Session) -> bool:
        policy = self._policies.get(session.endpoint)
        if policy is None:
            return False
        return (policy.on_close.notify and session.interactive) or policy.on_close.clear_auth_profiles

    def _release(self, slot: Conversation) -> None:
        """Hand a conversation held by the batch closer back: run what queued meanwhile."""
        slot.state = SlotState.IDLE
        if slot.queue:
            self._start_worker(slot)
        else:
            self._forget_if_empty(slot)

    # -- operator actions --------------------------------------------------------------------

    def open_session(self, endpoint: str, conversation: str) -> Session | None:
        """The open session of a conversation, from memory."""
        slot = self._conversations.get(endpoint, {}).get(conversation)
        return slot.session if slot is not None else None

    def live_view(self, session: Session) -> Session:
        """The in-memory version of an open session (its deadline may have moved since the
        last write), else the given one."""
        live = self.open_session(session.endpoint, session.conversation)
        return live if live is not None and live.id == session.id else session

    async def close(self, session_id: str, *, reason: CloseReason = CloseReason.ADMIN, notify: bool = True) -> Session:
        """Close an open session now (admin API); raises SessionNotFound / SessionNotOpen."""
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        live = self.open_session(session.endpoint, session.conversation)
        if live is None or live.id != session_id:
            raise SessionNotOpen(session_id)
        done: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._push(self._slot(session.endpoint, session.conversation), CloseItem(session_id, reason, notify, done))
        return await done

    async def send_bot_message(self, endpoint: str, conversation: str, text: str) -> Session:
        """A bot-initiated message; opens a non-interactive session when none is open (S13)."""
        if endpoint not in self._policies:
            raise SessionNotFound(f"unknown endpoint {endpoint}")
        done: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._push(self._slot(endpoint, conversation), BotMessageItem(text, done))
        return await done

    async def _handle_bot_message(self, slot: Conversation, item: BotMessageItem) -> None:
        policy = self._policies[slot.endpoint]
        now = self._clock()
        session = slot.session
        opened = None
        if session is None:
            # Its timer starts at this message; the closure notice only if it turns interactive.
            session = opened = self._new_session(policy, slot.conversation, now, interactive=False)
        change = Change(sessions=[session])
        message = self._message(session, MessageKind.BOT, item.text, f"bot:{uuid.uuid4().hex}")
        # Platform windows (Messenger's 24 h) count from the user's last message, whatever
        # session it was in: the contact knows it.
        contact = await self._store.get_contact(contact_id_of(slot.endpoint, slot.conversation))
        message.user_last_seen_at = contact.last_user_message_at if contact is not None else None
        change.outbox.append(message)
        await self._commit(slot, change, opened=opened)
        item.done.set_result(session)

    async def set_policy(self, policy: EndpointPolicy) -> None:
        """Apply a changed endpoint policy to its open sessions at once (re-arming timers),
        yielding to the loop every few thousand sessions so a big endpoint never stalls it."""
        self._policies[policy.endpoint] = policy
        slots = list(self._conversations.get(policy.endpoint, {}).values())
        for done, slot in enumerate(slots, start=1):
            if done % _RESTORE_YIELD_EVERY == 0:
                await asyncio.sleep(0)
                if self._policies.get(policy.endpoint) is not policy:
                    return  # a newer policy took over; it re-applies to every session
            session = slot.session
            if session is None:
                continue
            session.expires_at = policy.deadline(session.last_activity_at)
            if session.expires_at is None or policy.mode is SessionMode.LAZY:
                self._timers.disarm(slot)
            elif slot.state != SlotState.CLOSING:
                self._arm(slot)

    def policy(self, endpoint: str) -> EndpointPolicy | None:
        return self._policies.get(endpoint)


def _include(change: Change, contact: Contact) -> None:
    """Add ``contact`` to the change once (several rules may touch it in one turn)."""
    if not any(c is contact for c in change.contacts):
        change.contacts.append(contact)
