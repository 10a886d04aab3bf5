"""Operator actions for conversations another instance owns (``OperatorCalls``, a base of
``RedisOwnership``): ``POST /admin/sessions/<id>/close``, ``POST /admin/messages`` and a retried
dead letter go to the owner. A free conversation is taken here; one whose owner is alive gets
the action on its wake stream and answers on a reply list (``{P}:reply:<uuid>``, expiring); one
whose owner is dead waits for the takeover (bounded by ``CALL_TIMEOUT_S``)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.errors import SessionNotFound, SessionNotOpen, StoreError, Unavailable
from gateway.models import OutboundMessage, Session, contact_id_of
from gateway.sessions.ownership import OwnershipHost
from gateway.store.redis import RedisStore
from gateway.store.redis_keys import Keys

log = logging.getLogger("gateway.ownership")

CALL_TIMEOUT_S = 10.0  # an operator action forwarded to the owner
REPLY_TTL_S = 30
LEASE_TTL_MS = 1200  # a heartbeat this old: the instance is gone and its conversations move


class OperatorCalls:
    """Routes operator actions to the conversation's owner; ``RedisOwnership`` provides the
    state and the takeover this needs."""

    instance_id: str
    forwarded_calls: int
    _store: RedisStore
    _keys: Keys
    _host: OwnershipHost | None
    _blocking: Any  # a client for blocking reads (BLPOP)
    _acquire: AsyncScript
    _quiet: QuietLog

    def holds(self, endpoint: str, conversation: str) -> bool:
        raise NotImplementedError

    def _holding(self, contact: str, token: str | None) -> bool:
        raise NotImplementedError

    async def _take_over(self, contacts: list[str], tokens: list[str]) -> None:
        raise NotImplementedError

    # -- operator actions ------------------------------------------------------------------------

    async def close_elsewhere(self, session: Session, notify: bool) -> Session:
        args = {"session": session.id, "notify": notify}
        return await self._route("close", session.endpoint, session.conversation, args)

    async def bot_message_elsewhere(self, endpoint: str, conversation: str, text: str) -> Session:
        return await self._route("bot", endpoint, conversation, {"text": text})

    async def forward_message(self, message: OutboundMessage) -> bool:
        """A retried dead letter goes to its conversation's owner (False: deliver it here)."""
        contact = contact_id_of(message.endpoint, message.conversation)
        if self.holds(message.endpoint, message.conversation):
            return False
        status, detail = await self._route_of(contact)
        if status in ("acquired", "mine"):
            await self._take_over([contact], [detail])  # loads its pending messages, this one too
        elif status == "other":
            wake = {"kind": "outbox", "contact": contact}
            await self._store._call(self._store.client.xadd(self._keys.wake(detail), wake))  # type: ignore[arg-type]
        return True  # "dead": the instance taking it over loads it

    async def _route_of(self, contact: str) -> tuple[str, str]:
        args = [self._keys.prefix, self.instance_id, str(LEASE_TTL_MS), contact]
        status, detail = await self._store._call(self._acquire(keys=[], args=args))
        return str(status), str(detail)

    async def _route(self, op: str, endpoint: str, conversation: str, args: dict[str, Any]) -> Session:
        """Run ``op`` where the conversation is held: here (taking a free lease), or at its
        owner; waits for a takeover while the owner is dead."""
        contact = contact_id_of(endpoint, conversation)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CALL_TIMEOUT_S
        while loop.time() < deadline:
            status, detail = await self._route_of(contact)
            if status in ("acquired", "mine"):
                if not self._holding(contact, detail):
                    await self._take_over([contact], [detail])
                return await self._local(op, endpoint, conversation, args)
            if status == "other":
                answer = await self._forward(detail, op, endpoint, conversation, args, deadline - loop.time())
                if answer is not None:
                    return answer
            await asyncio.sleep(0.1)  # the owner is gone or moved: its conversations move soon
        raise Unavailable("the instance holding this conversation does not answer; try again")

    async def _local(self, op: str, endpoint: str, conversation: str, args: dict[str, Any]) -> Session:
        assert self._host is not None  # bound before any request is served
        if op == "close":
            return await self._host.close(args["session"], notify=bool(args["notify"]))
        return await self._host.send_bot_message(endpoint, conversation, str(args["text"]))

    async def _forward(
        self, owner: str, op: str, endpoint: str, conversation: str, args: dict[str, Any], timeout_s: float
    ) -> Session | None:
        """Ask ``owner`` to run ``op``; its answer, or None when it did not answer in time."""
        reply = self._keys.reply(uuid.uuid4().hex)
        entry = {"kind": "call", "op": op, "endpoint": endpoint, "conversation": conversation}
        entry |= {"args": json.dumps(args), "reply": reply}
        self.forwarded_calls += 1
        await self._store._call(self._store.client.xadd(self._keys.wake(owner), entry))  # type: ignore[arg-type]
        try:
            popped = await self._blocking.blpop([reply], timeout=max(0.1, min(timeout_s, 3.0)))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis unavailable: {exc}") from exc
        if popped is None:
            return None
        answer = json.loads(popped[1])
        if "error" in answer:
            if answer["error"] == "moved":
                return None
            if answer["error"] == "not_open":
                raise SessionNotOpen(str(args.get("session")))
            if answer["error"] == "not_found":
                raise SessionNotFound(str(args.get("session", endpoint)))
            raise Unavailable(f"the owning instance failed: {answer['error']}")
        session = await self._store.get_session(answer["session"])
        if session is None:
            raise SessionNotFound(answer["session"])
        return session

    async def _serve_call(self, entry: dict[str, str]) -> None:
        """An operator action forwarded to this instance: run it, answer on the reply list."""
        endpoint, conversation = entry["endpoint"], entry["conversation"]
        answer: dict[str, str]
        if not self.holds(endpoint, conversation):
            answer = {"error": "moved"}
        else:
            try:
                session = await self._local(entry["op"], endpoint, conversation, json.loads(entry["args"]))
                answer = {"session": session.id}
            except SessionNotOpen:
                answer = {"error": "not_open"}
            except SessionNotFound:
                answer = {"error": "not_found"}
            except Exception as exc:
                log.exception("forwarded %s failed", entry["op"])
                answer = {"error": f"{type(exc).__name__}: {exc}"}
        pipe = self._store.client.pipeline(transaction=False)
        pipe.lpush(entry["reply"], json.dumps(answer))
        pipe.expire(entry["reply"], REPLY_TTL_S)
        await self._quiet.run(self._store._call(pipe.execute()), "answering a forwarded call")


class QuietLog:
    """Failures of background rounds (heartbeat, sweep, release) while Redis is down repeat
    several times a second: one warning per kind per ``every_s``, with the count since."""

    def __init__(self, every_s: float = 5.0) -> None:
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._missed: dict[str, int] = {}

    async def run(self, work: Awaitable[Any], what: str) -> None:
        """Run background ``work``; a failure is logged (the next round tries again)."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.note(what, exc)

    def note(self, what: str, exc: Exception) -> None:
        """Log that ``what`` failed with ``exc``, at most once per ``every_s`` per kind."""
        now = asyncio.get_running_loop().time()
        if now - self._last.get(what, -self._every_s) < self._every_s:
            self._missed[what] = self._missed.get(what, 0) + 1
            return
        self._last[what] = now
        missed = self._missed.pop(what, 0)
        also = f" (and {missed} more since the last warning)" if missed else ""
        if isinstance(exc, StoreError | RedisError | OSError):
            log.warning("%s failed: %s%s", what, exc, also)
        else:
            log.error("%s failed%s", what, also, exc_info=exc)
