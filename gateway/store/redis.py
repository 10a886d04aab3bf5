"""The Redis store (``storage.backend: redis``): state shared by several gateway instances.

Key schema: ``gateway/store/redis_keys.py``. Every state change is one Lua script
(``redis_scripts.py``), so it is atomic and never a read-modify-write race between instances:

- ``add_inbound``: the dedup id (``SET NX`` with the retention TTL), the event in the durable
  inbox and its conversation's pending list, the deadline moved at acceptance, and the route to
  the conversation's owner, in one step that completes before the webhook's 2xx.
- ``commit``: a whole ``Change`` (sessions, contacts, outbox, handled events, notices). Closes in
  ``Change.closes`` are claims: a session closes only if it is still open (and for inactivity,
  only if its stored deadline has passed), so two instances firing for one session make one
  close; its closure notice is keyed ``close:<session id>`` and queued in the same step.
  Writes of conversations this instance holds a lease for carry the lease's fencing token
  (``leases``): a conversation taken over by another instance refuses them (``LeaseLost``).

State-changing scripts leave through one writer (``redis_writer.py``): in submission order, one
pipeline per round trip. Reads are plain commands, pipelined (``redis_reads.py``). Errors of
redis-py become ``StoreError``; a connection lost is retried by redis-py's pool on the next
command, so the store reconnects by itself.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from enum import Enum
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from gateway.errors import StoreError
from gateway.models import Change, InboundEvent, StoredEvent, contact_id_of
from gateway.store import redis_codec as codec
from gateway.store import redis_scripts as lua
from gateway.store.redis_keys import Keys
from gateway.store.redis_lifecycle import RedisLifecycle
from gateway.store.redis_reads import CHUNK, ConversationState
from gateway.store.redis_writer import RedisWriter
from gateway.store.sqlite_rows import event_to_json

RETENTION_S = 7 * 24 * 3600  # dedup ids and handled events (DESIGN.md retention)
CLOSE_TOLERANCE_S = 0.0005  # a close claim accepts a deadline this far ahead (timers.EARLY_TOLERANCE_S)
SOCKET_TIMEOUT_S = 2.0  # a slower Redis is "down": webhooks get 503 rather than hang
CONNECT_TIMEOUT_S = 1.0
PROBE_TTL_MS = 10_000  # check_writable's key expires by itself
MAX_CONNECTIONS = 32

__all__ = ["ConversationState", "RedisStore", "redis_client"]


class _State(Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def redis_client(
    url: str, *, socket_timeout_s: float | None = SOCKET_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS
) -> aioredis.Redis:
    """A redis-py asyncio client with the gateway's timeouts (text responses). Its pool is
    bounded and blocking: a burst of webhooks waits for a connection (up to the socket timeout)
    instead of opening hundreds."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout_s,
        decode_responses=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=10,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


class RedisStore(RedisLifecycle):
    """The ``Store`` on the Redis at ``url``, under ``key_prefix``.

    ``instance_id`` (set by the ownership layer when several instances run) makes
    ``add_inbound`` route events: take a free conversation lease or wake the owner. ``leases``
    maps the conversations this instance holds to their fencing tokens.
    """

    def __init__(
        self,
        url: str,
        key_prefix: str = "gw",
        *,
        retention_s: int = RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.keys = Keys(key_prefix)
        self.instance_id = ""
        self.leases: dict[str, str] = {}
        self._retention_s = retention_s
        self._clock = clock
        self._state = _State.NEW
        self._redis: aioredis.Redis | None = None
        self._writer: RedisWriter | None = None

    def __repr__(self) -> str:  # the URL may hold a password: never shown
        return f"<RedisStore prefix={self.keys.prefix!r} {self._state.value}>"

    @property
    def client(self) -> aioredis.Redis:
        if self._state is not _State.OPEN or self._redis is None:
            raise StoreError("redis store is not open")
        return self._redis

    async def open(self) -> None:
        """Connect and check that Redis answers; ``StoreError`` when it does not."""
        if self._state is not _State.NEW:
            raise StoreError("store was opened already")
        self._redis = redis_client(self.url)
        self._state = _State.OPEN
        self._add_inbound = self._redis.register_script(lua.ADD_INBOUND)
        self._commit = self._redis.register_script(lua.COMMIT)
        self._parts_sent = self._redis.register_script(lua.PARTS_SENT)
        self._writer = RedisWriter(self._redis)
        self._set_deadlines = self._redis.register_script(lua.SET_DEADLINES)
        self._prune_held = self._redis.register_script(lua.PRUNE_HELD)
        self._register_lifecycle_scripts(self._redis)
        try:
            await self._call(self._redis.ping())
        except StoreError:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the connections. Safe to call twice."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._writer is not None:
            await self._writer.aclose()
        if self._redis is not None:
            await self._redis.aclose()

    async def check_writable(self, timeout_s: float = SOCKET_TIMEOUT_S) -> str | None:
        """None when Redis takes a write now; else why not (not open, down, read-only, or
        slower than ``timeout_s``). The probe is one small ``SET`` with a short TTL: cheap
        enough for ``/healthz`` once a second from every instance."""
        if self._state is not _State.OPEN or self._redis is None:
            return "redis store is not open"
        try:
            async with asyncio.timeout(timeout_s):
                await self._call(self._redis.set(self.keys.probe, "1", px=PROBE_TTL_MS))
        except TimeoutError:
            return f"redis took longer than {timeout_s:g} s to take a write"
        except StoreError as exc:
            return str(exc)
        return None

    def _write(self, script: AsyncScript, args: list[str]) -> asyncio.Future[Any]:
        """A state-changing script, through the writer: applied in submission order."""
        if self._state is not _State.OPEN or self._writer is None:
            raise StoreError("redis store is not open")
        return self._writer.submit(script, args)

    # -- inbox -----------------------------------------------------------------------------------

    async def add_inbound(
        self, endpoint: str, event: InboundEvent, arrival_at: float, *, extends_to: float | None = None
    ) -> StoredEvent | None:
        """Commit ``event`` as pending (see ``redis_scripts.ADD_INBOUND``); None for a redelivery."""
        contact = contact_id_of(endpoint, event.conversation)
        args = [
            self.keys.prefix,
            endpoint,
            event.dedup_key,
            contact,
            event_to_json(event),
            codec.number(arrival_at),
            "1" if event.is_interaction else "",
            "" if extends_to is None else codec.number(extends_to),
            self.instance_id,
            str(self._retention_s),
        ]
        result = await self._call(self._write(self._add_inbound, args))
        if int(result[0]) == 0:
            return None
        event_id, seq, route, detail = int(result[0]), int(result[1]), str(result[2]), str(result[3])
        owner = None
        if route == "acquired":
            self.leases[contact] = detail
        elif route == "forwarded":
            owner = detail
        return StoredEvent(event_id, endpoint, arrival_at, event, seq=seq, owner=owner)

    # -- writes ----------------------------------------------------------------------------------

    async def commit(self, change: Change) -> None:
        """Apply ``change`` atomically (one script). New outbox messages get their ``id``; closes
        in ``change.closes`` that the store refused are listed in ``change.refused_closes``.
        Raises ``LeaseLost`` when a conversation of the change moved to another instance and
        ``StoreError`` when the change breaks a rule (a second open session) or Redis fails."""
        try:
            document = json.dumps(self._change_document(change), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store change: {exc}") from exc
        ids, refused = await self._call(self._write(self._commit, [self.keys.prefix, document]))
        for message, message_id in zip(change.outbox, ids, strict=True):
            message.id = int(message_id)
        for i in range(0, len(refused), 3):
            session_id, verdict, deadline = refused[i : i + 3]
            if verdict == "gone":
                change.refused_closes[session_id] = None
            else:
                change.refused_closes[session_id] = float(deadline) if deadline else math.inf

    def _change_document(self, change: Change) -> dict[str, Any]:
        fence: dict[str, str] = {}

        def hold(contact: str) -> None:
            token = self.leases.get(contact)
            if token is not None:
                fence[contact] = token

        sessions = []
        for s in change.sessions:
            hold(s.contact_id)
            setting, deleting = codec.fields_of(s, codec.SESSION_FIELDS)
            sessions.append(
                {
                    "id": s.id,
                    "contact": s.contact_id,
                    "endpoint": s.endpoint,
                    "started_at": codec.number(s.started_at),
                    "expires_at": "" if s.expires_at is None else codec.number(s.expires_at),
                    "state": s.state.value,
                    "set": setting,
                    "del": deleting,
                }
            )
        closes = []
        for s in change.closes:
            setting, deleting = codec.fields_of(s, codec.CLOSE_FIELDS)
            closes.append(
                {
                    "id": s.id,
                    "contact": s.contact_id,
                    "token": self.leases.get(s.contact_id, ""),
                    "reason": "" if s.close_reason is None else s.close_reason.value,
                    "set": setting,
                    "del": [*deleting, "variables", "context", "accepted_deadline"],
                }
            )
        contacts = []
        for c in change.contacts:
            hold(c.id)
            contacts.append([c.id, codec.contact_to_json(c)])
        outbox = []
        for m in change.outbox:
            contact = contact_id_of(m.endpoint, m.conversation)
            hold(contact)
            setting, _ = codec.fields_of(m, codec.OUTBOX_FIELDS)
            outbox.append({"key": m.key, "contact": contact, "state": m.state.value, "set": setting})
        updates = []
        for m in change.outbox_updates:
            setting, deleting = codec.fields_of(m, codec.OUTBOX_UPDATE_FIELDS)
            updates.append({"id": str(m.id), "state": m.state.value, "set": setting, "del": deleting})
        return {
            "now": codec.number(self._clock()),
            "tol": codec.number(CLOSE_TOLERANCE_S),
            "retention": str(self._retention_s),
            "fence": [[contact, token] for contact, token in fence.items()],
            "closes": closes,
            "sessions": sessions,
            "contacts": contacts,
            "outbox": outbox,
            "handled": [str(event_id) for event_id in change.handled_events],
            "updates": updates,
            "notices": [[session_id, notice] for session_id, notice in change.notices],
        }

    async def record_parts_sent(self, message_id: int, parts_sent: int) -> None:
        """Set ``parts_sent`` of an outbox message and nothing else."""
        await self._call(self._write(self._parts_sent, [self.keys.prefix, str(message_id), str(parts_sent)]))

    async def set_deadlines(self, deadlines: Sequence[tuple[str, float | None]]) -> list[float | None]:
        """Store re-derived deadlines of open sessions (a changed setting, an adoption); returns
        what is stored, which an accepted but unhandled message may have moved later."""
        stored: list[float | None] = []
        for start in range(0, len(deadlines), CHUNK):
            args = [self.keys.prefix]
            for session_id, deadline in deadlines[start : start + CHUNK]:
                args += [session_id, "" if deadline is None else codec.number(deadline)]
            result = await self._call(self._set_deadlines(keys=[], args=args))
            stored += [float(d) if d else None for d in result]
        return stored

    async def put_override(self, scope: str, value: dict[str, Any]) -> None:
        """Store the runtime settings of ``scope``, replacing earlier ones."""
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"cannot store override {scope!r}: {exc}") from exc
        await self._call(self.client.hset(self.keys.overrides, scope, text))

    async def delete_override(self, scope: str) -> None:
        """Drop the runtime settings of ``scope`` (no error when there are none)."""
        await self._call(self.client.hdel(self.keys.overrides, scope))

    def _prune_held_chunk(self, before: float, holding_channels: Collection[str], limit: int) -> asyncio.Future[Any]:
        """At most ``limit`` messages still pending for ``holding_channels`` created before ``before``."""
        args = [self.keys.prefix, codec.number(before), str(limit), *sorted(holding_channels)]
        return self._write(self._prune_held, args)
