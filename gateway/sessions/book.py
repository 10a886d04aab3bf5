"""The open sessions in memory, and the commit that changes them.

Every path that changes sessions (a message turn, a close, a bot message) builds a ``Change``
and commits it here: the store first, then memory follows (the open session of the slot, the
open count, its timer, metrics, listeners), then the committed messages go to the outbox.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence

from gateway.logs import log_context
from gateway.metrics import Metrics
from gateway.models import Change, CloseReason, Contact, InboundEvent, MessageKind, OutboundMessage, Session
from gateway.policy import EndpointPolicy
from gateway.sessions.state import Conversation, ManagerStats, OutboxSink
from gateway.sessions.timers import SessionTimers
from gateway.settings import SessionMode
from gateway.store.base import Store

log = logging.getLogger("gateway.sessions")

SessionListener = Callable[[Session], None]


class SessionBook:
    """Keeps memory in step with committed changes. ``policies`` is the manager's live map."""

    def __init__(
        self,
        store: Store,
        outbox: OutboxSink,
        timers: SessionTimers,
        policies: dict[str, EndpointPolicy],
        *,
        metrics: Metrics,
        stats: ManagerStats,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._timers = timers
        self._policies = policies
        self._metrics = metrics
        self._stats = stats
        self._clock = clock
        self.open_count = 0
        self.listeners: list[SessionListener] = []  # told of every opened and closed session
        self.close_hooks: list[SessionListener] = []  # run after a close committed (S12 scripts)

    def arm(self, slot: Conversation) -> None:
        """Arm the slot's timer, unless its endpoint closes nothing at the deadline."""
        policy = self._policies.get(slot.endpoint)
        if policy is None or policy.mode is SessionMode.LAZY:
            return  # lazy (S8): nothing happens at the deadline
        self._timers.arm(slot)  # no-op for a session that never expires (S3)

    def arm_all(self, slots: list[Conversation]) -> None:
        """``arm`` each slot (restore)."""
        lazy = {name for name, policy in self._policies.items() if policy.mode is SessionMode.LAZY}
        self._timers.arm_all(slot for slot in slots if slot.endpoint in self._policies and slot.endpoint not in lazy)

    def restored(self, slots: list[Conversation], sessions: list[Session]) -> None:
        """Sessions loaded at start are open again, each in its slot (their timers are armed
        later, in bulk)."""
        for slot, session in zip(slots, sessions, strict=True):
            slot.session = session
        self.open_count += len(sessions)

    def forget(self, slot: Conversation) -> None:
        """The slot's session leaves memory without a close here: another instance has it now,
        or closed it (several instances on a shared store)."""
        if slot.session is not None:
            slot.session = None
            self._timers.disarm(slot)
            self.open_count -= 1

    async def commit(
        self,
        slot: Conversation,
        change: Change,
        *,
        opened: Session | None = None,
        closed: Iterable[Session] = (),
    ) -> None:
        """Commit ``change``; then ``closed`` sessions leave memory, ``opened`` joins it (and is
        armed), and the change's messages go to the outbox."""
        await self._store.commit(change)
        for session in closed:
            self.after_close(slot, session)
        if opened is not None and opened.is_open:
            self._after_open(slot, opened)
        if log.isEnabledFor(logging.DEBUG):  # log_context costs a dict per call
            for message in change.outbox:
                log.debug(
                    "message out queued: endpoint=%s conversation=%s kind=%s",
                    message.endpoint,
                    message.conversation,
                    message.kind,
                    extra=log_context(message.endpoint, message.conversation, message.session_id),
                )
        self._outbox.submit(change.outbox)

    def submit(self, messages: list[OutboundMessage]) -> None:
        """Hand committed messages to the outbox."""
        self._outbox.submit(messages)

    def _after_open(self, slot: Conversation, session: Session) -> None:
        slot.session = session
        self.open_count += 1
        self._metrics.inc("gateway_sessions_opened_total", endpoint=session.endpoint)
        if log.isEnabledFor(logging.DEBUG):  # log_context costs a dict per call
            log.debug(
                "session opened: %s endpoint=%s conversation=%s interactive=%s developer=%s",
                session.id,
                session.endpoint,
                session.conversation,
                session.interactive,
                session.developer,
                extra=log_context(session.endpoint, session.conversation, session.id),
            )
        self.arm(slot)
        self.notify(session)

    def after_close(self, slot: Conversation, session: Session) -> None:
        """A close of ``session`` committed: it leaves memory; listeners and hooks hear of it."""
        self.after_closes([(slot, session)])

    def after_closes(self, closed: Sequence[tuple[Conversation, Session]]) -> None:
        """``after_close`` for closes committed together (a batch of due sessions): each leaves
        memory and is announced; their metrics are counted once per endpoint, not per session
        (in a mass expiry the event loop's work per close is what limits it)."""
        now = self._clock()  # they committed together
        counts: dict[tuple[str, CloseReason | None], int] = {}
        lags: dict[str, list[float]] = {}
        proactive: dict[str, bool] = {}  # by endpoint: its close lags go into the histogram
        record_lags, debug = self._stats.record_lags, log.isEnabledFor(logging.DEBUG)
        listeners, hooks, disarm = self.listeners, self.close_hooks, self._timers.disarm
        left = 0
        for slot, session in closed:
            if slot.session is session:
                slot.session = None
                disarm(slot)
                left += 1
            endpoint, reason = session.endpoint, session.close_reason
            key = (endpoint, reason)
            counts[key] = counts.get(key, 0) + 1
            if reason is CloseReason.INACTIVITY and session.expires_at:
                lag_s = now - session.expires_at
                counted = proactive.get(endpoint)
                if counted is None:
                    policy = self._policies.get(endpoint)
                    counted = proactive[endpoint] = policy is not None and policy.mode is SessionMode.PROACTIVE
                if counted:
                    lags.setdefault(endpoint, []).append(max(0.0, lag_s))
                if record_lags:
                    self._stats.close_lags_s.append(lag_s)
            if debug:  # log_context costs a dict per call
                log.debug(
                    "session closed: %s reason=%s notice=%s",
                    session.id,
                    reason,
                    session.notice,
                    extra=log_context(endpoint, session.conversation, session.id),
                )
            if listeners:
                self.notify(session)
            for hook in hooks:
                hook(session)
        self.open_count -= left
        self._stats.closes_committed += len(closed)
        for (endpoint, reason), count in counts.items():
            self._metrics.inc("gateway_sessions_closed_total", count, endpoint=endpoint, reason=str(reason))
        for endpoint, values in lags.items():
            self._metrics.observe_many("gateway_close_lag_seconds", values, endpoint)

    def notify(self, session: Session) -> None:
        for listener in self.listeners:
            try:
                listener(session)
            except Exception:
                log.exception("session listener failed")

    # -- building blocks shared by the turn and the close paths ------------------------------

    def new_session(self, policy: EndpointPolicy, conversation: str, at: float, *, interactive: bool) -> Session:
        return Session(
            id=os.urandom(16).hex(),  # 128 random bits, as uuid4().hex has 122, without a UUID object
            endpoint=policy.endpoint,
            channel=policy.channel,
            conversation=conversation,
            started_at=at,
            last_activity_at=at,
            expires_at=policy.deadline(at),
            interactive=interactive,
            developer=policy.developer,  # S14
        )

    def message(
        self, session: Session, kind: MessageKind, text: str, key: str, event: InboundEvent | None = None
    ) -> OutboundMessage:
        """An outbound message of ``session`` (``key`` makes it once-only in the outbox)."""
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


def include_contact(change: Change, contact: Contact) -> None:
    """Add ``contact`` to the change once (several rules may touch it in one turn)."""
    if not any(c is contact for c in change.contacts):
        change.contacts.append(contact)
