"""The close paths: a timer's fire, an operator's close, a batch of sessions falling due
together, sessions of removed endpoints at start, and the close scripts that run afterwards.

Every close re-checks the deadline first (a message accepted meanwhile wins), decides the
notice by the pure rules of ``gateway.session_rules``, and commits the close and its notice in
one ``Change``, so neither exists without the other. Timer and operator closes are claims
(``Change.closes``): a store shared by several instances closes the session only if it is still
open there and, for inactivity, its stored deadline has passed; a refused claim changes nothing
(``_refused`` puts memory back in step).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from gateway.close_scripts import CloseScripts
from gateway.errors import SessionNotOpen
from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import Change, CloseReason, Contact, MessageKind, Session, contact_id_of
from gateway.policy import EndpointPolicy
from gateway.session_rules import (
    NOTICE_QUEUED,
    ClosureTexts,
    clear_auth_profiles,
    clears_auth_profiles,
    close_session,
    notice_decision,
)
from gateway.sessions.book import SessionBook, include_contact
from gateway.sessions.scheduler import ConversationScheduler
from gateway.sessions.state import ClearProfilesItem, CloseItem, Conversation, EraseItem, ExpireItem
from gateway.sessions.timers import SessionTimers
from gateway.store.base import Store
from gateway.wire import session_json

log = logging.getLogger("gateway.sessions")

BULK_CHUNK = 5000  # sessions per commit when closing sessions of removed endpoints
# Committed closes of a due batch leave memory this many at a time, the loop running between:
# the results of the batches in flight land in one loop iteration, and 2000 closes handled in
# one go held timers back ~15 ms (bench/sessions.py, 100,000 of 1M due in one second).
AFTER_CLOSE_CHUNK = 100


class SessionCloser:
    """Closes sessions. ``aclose`` cancels close scripts still running."""

    def __init__(
        self,
        store: Store,
        book: SessionBook,
        scheduler: ConversationScheduler,
        timers: SessionTimers,
        policies: dict[str, EndpointPolicy],
        *,
        metrics: Metrics,
        clock: Callable[[], float],
        scripts: CloseScripts | None,
    ) -> None:
        self._store = store
        self._book = book
        self._scheduler = scheduler
        self._timers = timers
        self._policies = policies
        self._metrics = metrics
        self._clock = clock
        self._scripts = scripts
        self._script_tasks: set[asyncio.Task[None]] = set()
        self._texts = ClosureTexts()
        self._stopped = False
        book.close_hooks.append(self._start_close_script)

    def stop(self) -> None:
        """Start no new work (a close script's result is dropped from now on)."""
        self._stopped = True

    async def aclose(self) -> None:
        """Cancel close scripts still running. Idempotent."""
        self.stop()
        tasks = list(self._script_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close_into(
        self,
        change: Change,
        session: Session,
        *,
        reason: CloseReason,
        notify: bool,
        contact: Contact | None,
        policy: EndpointPolicy | None,
        now: float,
        in_change: bool = False,
    ) -> Session:
        """Close ``session`` inside ``change``, with its closure notice when one is due.
        ``in_change``: the session is already among ``change.sessions``."""
        session.notice = notice_decision(session, reason, notify, contact)
        text = self._texts.pick(policy, contact) if policy is not None and session.notice == NOTICE_QUEUED else None
        if session.notice == NOTICE_QUEUED and text is None:
            session.notice = "none"
        if text is not None:
            change.outbox.append(self._book.message(session, MessageKind.CLOSURE, text, f"close:{session.id}"))
        close_session(session, reason, now)
        if contact is not None and clears_auth_profiles(reason, policy) and clear_auth_profiles(contact):
            include_contact(change, contact)
        if not in_change:
            change.sessions.append(session)
        return session

    # -- one session, from its conversation's queue ------------------------------------------

    async def handle_expire(self, slot: Conversation, item: ExpireItem) -> None:
        session = slot.session
        if session is None or session.id != item.session_id:
            return  # closed meanwhile (refresh, flow, admin): nothing to do
        if not self._timers.is_due(session):
            self._book.arm(slot)  # a message moved the deadline while the fire waited in the queue
            return
        policy = self._policies.get(session.endpoint)
        notify = policy is not None and policy.on_close.notify
        await self._close_now(slot, session, reason=CloseReason.INACTIVITY, notify=notify)

    def _still_due(self, slot: Conversation, session: Session) -> bool:
        """After an await: a message that arrived before the deadline may have moved it
        meanwhile (the manager moves it at arrival); then the session lives on, re-armed."""
        if self._timers.is_due(session):
            return True
        self._book.arm(slot)
        return False

    async def handle_close(self, slot: Conversation, item: CloseItem) -> None:
        session = slot.session
        if session is None or session.id != item.session_id:
            item.done.set_exception(SessionNotOpen(item.session_id))
            return
        if await self._close_now(slot, session, reason=item.reason, notify=item.notify):
            item.done.set_result(session)
        else:
            item.done.set_exception(SessionNotOpen(item.session_id))

    async def handle_erase(self, slot: Conversation, item: EraseItem) -> None:
        """Close the open session silently (reason ``admin``), then erase the contact."""
        session = slot.session
        if session is not None:
            await self._close_now(slot, session, reason=CloseReason.ADMIN, notify=False)
        item.done.set_result(await self._store.erase_contact(slot.endpoint, slot.conversation))

    async def _close_now(self, slot: Conversation, session: Session, *, reason: CloseReason, notify: bool) -> bool:
        """Close one session in its own commit (a close claim: nothing else of it changed since
        its last commit). False when the store refused the claim (several instances)."""
        contact = await self._store.get_contact(session.contact_id)
        if reason is CloseReason.INACTIVITY and not self._still_due(slot, session):
            return False
        change = Change()
        policy = self._policies.get(session.endpoint)
        now = self._clock()
        self.close_into(
            change, session, reason=reason, notify=notify, contact=contact, policy=policy, now=now, in_change=True
        )
        change.closes.append(session)
        await self._store.commit(change)
        if session.id in change.refused_closes:
            await self._refused(slot, session, change.refused_closes[session.id])
            return False
        self._book.after_close(slot, session)
        self._book.submit(change.outbox)
        return True

    async def _refused(self, slot: Conversation, session: Session, deadline: float | None) -> None:
        """The store refused to close ``session`` (a store shared by several instances): another
        instance closed it or owns it now (None), or a message accepted elsewhere moved its
        deadline (reload the open session, which the refused close changed only in memory)."""
        if deadline is None or slot.session is not session:
            if slot.session is session:
                self._book.forget(slot)
            log.info("close of session %s refused: closed or owned elsewhere", session.id)
            return
        fresh = await self._store.get_session(session.id)
        if fresh is None or not fresh.is_open or slot.session is not session:
            if slot.session is session:
                self._book.forget(slot)
            return
        fresh.expires_at = None if deadline == math.inf else deadline
        slot.session = fresh
        self._book.arm(slot)

    # -- many sessions -----------------------------------------------------------------------

    async def close_due(self, batch: list[Conversation]) -> None:
        """Close the held conversations' sessions still due, in one commit; release them all."""
        closing: list[Conversation] = []
        due_by = self._timers.due_by()
        for slot in batch:
            if slot.session is not None and self._timers.is_due(slot.session, due_by):
                closing.append(slot)
            else:  # a message moved the deadline since the fire
                self._scheduler.release(slot)
                self._book.arm(slot)
        if not closing:
            return
        # Contacts matter only where a notice may go out (an opted-out contact gets none) or
        # auth profiles are to be cleared; mass expiry of silent endpoints reads none.
        wanted = [slot.session.contact_id for slot in closing if slot.session and self._needs_contact(slot.session)]
        contacts = await self._store.get_contacts(wanted) if wanted else {}
        if wanted:  # re-checked after the read: a message may have moved a deadline meanwhile
            due_by = self._timers.due_by()
            still = [slot for slot in closing if slot.session is not None and self._timers.is_due(slot.session, due_by)]
            for slot in closing:
                if slot not in still:
                    self._scheduler.release(slot)
                    self._book.arm(slot)
            closing = still
            if not closing:
                return
        change = Change()
        now = self._clock()
        for slot in closing:
            assert slot.session is not None  # checked above; for the type checker only
            policy = self._policies.get(slot.endpoint)
            self.close_into(
                change,
                slot.session,
                reason=CloseReason.INACTIVITY,
                notify=policy is not None and policy.on_close.notify,
                contact=contacts.get(slot.session.contact_id),
                policy=policy,
                now=now,
                in_change=True,
            )
            change.closes.append(slot.session)  # nothing else changed since its last commit
        await self._store.commit(change)
        refused = change.refused_closes
        closed = list(zip(closing, change.closes, strict=True))
        for start in range(0, len(closed), AFTER_CLOSE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = closed[start : start + AFTER_CLOSE_CHUNK]
            for slot, session in chunk:
                if session.id in refused:
                    await self._refused(slot, session, refused[session.id])
            self._book.after_closes([(slot, session) for slot, session in chunk if session.id not in refused])
            for slot, _ in chunk:
                self._scheduler.release(slot)
        self._book.submit([m for m in change.outbox if m.id])  # a refused close queued no notice

    def _needs_contact(self, session: Session) -> bool:
        policy = self._policies.get(session.endpoint)
        if policy is None:
            return False
        on_close = policy.on_close
        return on_close.clear_auth_profiles or (on_close.notify and session.interactive)

    async def close_removed(self, sessions: list[Session]) -> None:
        """Close sessions of endpoints no longer configured (reason ``endpoint_removed``)."""
        now = self._clock()
        for start in range(0, len(sessions), BULK_CHUNK):
            change = Change()
            for session in sessions[start : start + BULK_CHUNK]:
                reason = CloseReason.ENDPOINT_REMOVED
                self.close_into(change, session, reason=reason, notify=False, contact=None, policy=None, now=now)
            await self._store.commit(change)
            for session in change.sessions:
                log.debug(
                    "session closed: %s reason=endpoint_removed (endpoint %s is gone)", session.id, session.endpoint
                )
                self._metrics.inc("gateway_sessions_closed_total", endpoint=session.endpoint, reason="endpoint_removed")
        if sessions:
            gone = ", ".join(sorted({session.endpoint for session in sessions}))
            log.info("closed %d open sessions of endpoints no longer configured (%s)", len(sessions), gone)

    # -- close scripts (S12) -----------------------------------------------------------------

    def _start_close_script(self, session: Session) -> None:
        if self._scripts is None:
            return  # none configured (every close of a mass expiry comes here)
        policy = self._policies.get(session.endpoint)
        if policy is None or not policy.on_close.script:
            return
        task = asyncio.create_task(self._run_close_script(self._scripts, session, policy.on_close.script, policy))
        self._script_tasks.add(task)
        task.add_done_callback(self._script_tasks.discard)

    async def _run_close_script(
        self, scripts: CloseScripts, session: Session, ref: str, policy: EndpointPolicy
    ) -> None:
        """After the close committed: never delays or undoes the close."""
        try:
            contact = await self._store.get_contact(session.contact_id)
            profiles = sorted(contact.auth_profiles) if contact is not None else []
            timeout_s = policy.on_close.script_timeout_seconds
            names = await scripts.run(ref, timeout_s, session_json(session), profiles)
        except Exception as exc:
            self._metrics.inc("gateway_close_script_errors_total", endpoint=session.endpoint)
            log.warning(
                "close script for session %s failed: %s",
                session.id,
                exc,
                extra=log_context(session.endpoint, session.conversation, session.id),
            )
            return
        log.debug("close script ran for session %s; auth profiles to clear: %s", session.id, names or "none")
        if names and not self._stopped:
            # Through the conversation's queue: a turn of the next session must not race it.
            self._scheduler.push(self._scheduler.slot(session.endpoint, session.conversation), ClearProfilesItem(names))

    async def handle_clear_profiles(self, slot: Conversation, item: ClearProfilesItem) -> None:
        contact = await self._store.get_contact(contact_id_of(slot.endpoint, slot.conversation))
        if contact is not None and clear_auth_profiles(contact, item.names):
            await self._store.commit(Change(contacts=[contact]))
