"""A message turn: one inbound event of a conversation, handled from its queue.

The event finds (or opens) the conversation's session, moves its deadline, reaches the flow
(or the gateway's own discard commands, S18), and the session's change, the flow's replies and
any close it causes commit together. Also the bot-initiated message (S13), which opens a
non-interactive session when none is open.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import Conflict
from gateway.flows import Flow, FlowResult, FlowTurn
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import (
    Change,
    CloseReason,
    Contact,
    EventKind,
    InboundEvent,
    MessageKind,
    Session,
    StoredEvent,
    contact_id_of,
)
from gateway.policy import EndpointPolicy
from gateway.session_rules import (
    apply_discard,
    apply_flow_result,
    clear_auth_profiles,
    clear_ttl_variables,
    discard_command,
    live_ttl_variables,
)
from gateway.sessions.book import SessionBook, include_contact
from gateway.sessions.closing import SessionCloser
from gateway.sessions.state import BotMessageItem, Conversation
from gateway.settings import SessionMode
from gateway.store.base import Store

log = logging.getLogger("gateway.sessions")


@dataclass(slots=True)
class _Resumed:
    """What became of the conversation's session when the event arrived."""

    session: Session | None  # the session the event belongs to; None: a new one opens
    after_expiry: bool = False  # lazy mode: the first message after the deadline (S8)
    result: FlowResult | None = None  # the flow's answer, when judging already asked it


class MessageTurn:
    """Handles the inbound events and bot messages of a conversation, one at a time."""

    def __init__(
        self,
        store: Store,
        flow: Flow,
        book: SessionBook,
        closer: SessionCloser,
        policies: dict[str, EndpointPolicy],
        *,
        metrics: Metrics,
        clock: Callable[[], float],
        error_reply: str | None,
    ) -> None:
        self._store = store
        self._flow = flow
        self._book = book
        self._closer = closer
        self._policies = policies
        self._metrics = metrics
        self._clock = clock
        self._error_reply = error_reply

    async def handle_event(self, slot: Conversation, stored: StoredEvent) -> None:
        """Handle one inbound event; it is marked handled in the same commit."""
        event = stored.event
        policy = self._policies.get(stored.endpoint)
        change = Change(handled_events=[stored.id])
        if policy is None:  # endpoint removed while the event waited: nothing to answer with
            await self._store.commit(change)
            return
        if stored.contact_known:  # read with the inbox commit, nothing could change it since
            contact = stored.contact or self._new_contact(stored.endpoint, event.conversation)
            stored.contact, stored.contact_known = None, False
        else:
            contact = await self._contact(stored.endpoint, event.conversation)
        now = self._clock()
        if event.kind is EventKind.REFRESH:
            await self._refresh(slot, change, contact, policy, now)
            return
        if event.kind in (EventKind.OPT_OUT, EventKind.OPT_IN):
            contact.opted_out = event.kind is EventKind.OPT_OUT
            change.contacts.append(contact)
            await self._store.commit(change)
            log.info("contact %s opted %s", contact.id, "out" if contact.opted_out else "in")
            return

        closed: list[Session] = []
        resumed = await self._resume(slot.session, stored, change, closed, contact, policy, now)
        session = resumed.session
        opened = session is None
        if session is None:
            session = self._book.new_session(policy, event.conversation, stored.arrival_at, interactive=True)
        _record_user_activity(session, contact, stored, policy)
        result = await self._answer(session, contact, event, policy, resumed, now)
        apply_flow_result(session, contact, result, now)
        for n, text in enumerate(result.replies):
            change.outbox.append(self._book.message(session, MessageKind.REPLY, text, f"reply:{stored.id}:{n}", event))
        change.sessions.append(session)
        include_contact(change, contact)
        if result.end_session:
            closed.append(
                self._closer.close_into(
                    change,
                    session,
                    reason=CloseReason.FLOW,
                    notify=policy.on_close.notify,
                    contact=contact,
                    policy=policy,
                    now=now,
                    in_change=True,
                )
            )
        await self._book.commit(slot, change, opened=session if opened else None, closed=closed)

    async def _refresh(
        self, slot: Conversation, change: Change, contact: Contact, policy: EndpointPolicy, now: float
    ) -> None:
        """S17: a web chat refresh ends the session; everything goes, TTL variables too."""
        closed: list[Session] = []
        if slot.session is not None:
            closed.append(
                self._closer.close_into(
                    change,
                    slot.session,
                    reason=CloseReason.REFRESH,
                    notify=False,
                    contact=contact,
                    policy=policy,
                    now=now,
                )
            )
        clear_ttl_variables(contact)
        clear_auth_profiles(contact)
        include_contact(change, contact)
        await self._book.commit(slot, change, closed=closed)

    async def _resume(
        self,
        session: Session | None,
        stored: StoredEvent,
        change: Change,
        closed: list[Session],
        contact: Contact,
        policy: EndpointPolicy,
        now: float,
    ) -> _Resumed:
        """The open session carries on unless the event arrived after its deadline: then it
        closes (into ``change``), or in lazy mode the flow judges whether it carries on (S8)."""
        if session is None or session.expires_at is None or session.expires_at > stored.arrival_at:
            return _Resumed(session)
        if policy.mode is SessionMode.LAZY and session.intent is not None:
            # S8: the flow judges whether the returning user carries on the same intent.
            result = await self._call_flow(session, contact, stored.event, after_expiry=True, now=now)
            if result.intent == session.intent:
                return _Resumed(session, after_expiry=True, result=result)
            # A new intent: the old session ends silently and the message is handled again, in
            # the new session (the flow sees it twice; message_id tells).
            notify = False
        else:
            # Lazy mode never sends a notice: nothing happened at the deadline (S8).
            notify = policy.mode is SessionMode.PROACTIVE and policy.on_close.notify
        # Lazy mode, a flow that reported no intent: the message opens a new session and is
        # still the first one after the deadline (DESIGN.md, "Flows": after_expiry).
        after_expiry = policy.mode is SessionMode.LAZY and session.intent is None
        closed.append(
            self._closer.close_into(
                change,
                session,
                reason=CloseReason.INACTIVITY,
                notify=notify,
                contact=contact,
                policy=policy,
                now=now,
            )
        )
        return _Resumed(None, after_expiry=after_expiry)

    async def _answer(
        self,
        session: Session,
        contact: Contact,
        event: InboundEvent,
        policy: EndpointPolicy,
        resumed: _Resumed,
        now: float,
    ) -> FlowResult:
        """The gateway's own answer to a discard command (S18, no flow call), else the flow's
        (asked already when it judged a lazy session's return)."""
        command = discard_command(event.text, policy) if event.kind is EventKind.MESSAGE else None
        if command is None:
            if resumed.result is not None:
                return resumed.result
            return await self._call_flow(session, contact, event, after_expiry=resumed.after_expiry, now=now)
        apply_discard(session, command)  # the session stays open
        reply = policy.discard.all_reply if command == "discard all" else policy.discard.reply
        return FlowResult(replies=[reply] if reply else [])

    async def _call_flow(
        self, session: Session, contact: Contact, event: InboundEvent, *, after_expiry: bool, now: float
    ) -> FlowResult:
        turn = FlowTurn(
            session,
            event,
            contact_variables=live_ttl_variables(contact, now),
            auth_profiles=dict(contact.auth_profiles),
            after_expiry=after_expiry,
        )
        started = time.perf_counter()
        try:
            return await self._flow.handle(turn)
        except Exception as exc:  # any flow failure is counted and survived, never a lost event
            self._metrics.inc("gateway_flow_errors_total", endpoint=session.endpoint)
            log.warning(
                "flow failed for session %s: %s",
                session.id,
                exc,
                extra=log_context(session.endpoint, session.conversation, session.id),
            )
            return FlowResult(replies=[self._error_reply] if self._error_reply else [])
        finally:
            self._metrics.observe("gateway_flow_seconds", time.perf_counter() - started, session.endpoint)

    async def _contact(self, endpoint: str, conversation: str) -> Contact:
        contact = await self._store.get_contact(contact_id_of(endpoint, conversation))
        return contact if contact is not None else self._new_contact(endpoint, conversation)

    def _new_contact(self, endpoint: str, conversation: str) -> Contact:
        contact_id = contact_id_of(endpoint, conversation)
        return Contact(id=contact_id, endpoint=endpoint, conversation=conversation, created_at=self._clock())

    async def give_up_on(self, stored: StoredEvent) -> None:
        """An event whose handling raised unexpectedly (a bug, not a flow failure) is marked
        handled, so it does not fail again at every restart; it stays in the inbox table."""
        self._metrics.inc("gateway_event_errors_total", endpoint=stored.endpoint)
        try:
            await self._store.commit(Change(handled_events=[stored.id]))
        except Exception:
            log.exception("could not mark failed event %d handled; it will be retried at restart", stored.id)

    async def handle_bot_message(self, slot: Conversation, item: BotMessageItem) -> None:
        """A bot-initiated message; opens a non-interactive session when none is open (S13)."""
        policy = self._policies[slot.endpoint]
        now = self._clock()
        # In the conversation's queue, so an opt-out accepted before this message is seen.
        contact = await self._store.get_contact(contact_id_of(slot.endpoint, slot.conversation))
        if contact is not None and contact.opted_out:
            item.done.set_exception(Conflict("contact opted out", detail=f"{contact.id} opted out"))
            return
        session = slot.session
        opened = None
        if session is None:
            # Its timer starts at this message; the closure notice only if it turns interactive.
            session = opened = self._book.new_session(policy, slot.conversation, now, interactive=False)
        change = Change(sessions=[session])
        message = self._book.message(session, MessageKind.BOT, item.text, f"bot:{uuid.uuid4().hex}")
        # Platform windows (Messenger's 24 h) count from the user's last message, whatever
        # session it was in: the contact knows it.
        message.user_last_seen_at = contact.last_user_message_at if contact is not None else None
        change.outbox.append(message)
        await self._book.commit(slot, change, opened=opened)
        item.done.set_result(session)


def _record_user_activity(session: Session, contact: Contact, stored: StoredEvent, policy: EndpointPolicy) -> None:
    """A user message: the session is interactive (S13), counts it, and its deadline moves."""
    session.interactive = True
    session.message_count += 1
    session.last_activity_at = max(session.last_activity_at, stored.arrival_at)
    deadline = policy.deadline(stored.arrival_at)
    if deadline is not None and (session.expires_at is None or deadline > session.expires_at):
        session.expires_at = deadline
    contact.last_user_message_at = max(contact.last_user_message_at or 0.0, stored.arrival_at)
    if stored.event.sender_name:
        contact.display_name = stored.event.sender_name
