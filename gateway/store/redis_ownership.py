"""Several gateway instances on one Redis: who handles which conversation (``Ownership``).

- **One owner per conversation**, held as a lease ``{owner, token}`` (``redis_keys``): the
  instance whose ``add_inbound`` found the conversation free takes it; events accepted by other
  instances go to the owner's wake stream; the owner queues them in acceptance order (the
  conversation's ``seq``: a gap is filled from the conversation's pending list). Every new owner
  gets a new fencing token, and the store refuses writes carrying an old one (``LeaseLost``), so
  an instance that stalled past its lease can never overwrite the new owner's work.
- **Liveness** is a heartbeat (every ``HEARTBEAT_EVERY_S``) in Redis's own clock; one that is
  ``LEASE_TTL_MS`` old means the instance is gone (killed, stalled, cut off).
- **Takeover**: every instance sweeps (every ``SWEEP_EVERY_S``) for dead instances and adopts
  their conversations, a chunk per script (``ADOPT``): open sessions with their timers (overdue
  ones close at once), pending events, pending outbox messages. A fallback sweep of the deadline
  set adopts any session overdue by ``OVERDUE_GRACE_S`` whose conversation has no live owner.
  So the sessions of a killed instance close about ``LEASE_TTL_MS`` + one sweep after it died,
  or at their deadline when that is later (within 2 s in tests/test_scale_out.py).
- **Release**: a conversation with no session, no pending event and no pending message here
  gives its lease back (``RELEASE``, checked by the script), so leases do not pile up.
- **Operator actions** (close, bot message, a retried dead letter) for a conversation held
  elsewhere are forwarded to the owner through its wake stream and answered through a reply
  list (``redis_calls.py``).
- **Settings**: a runtime change through any instance is published on ``{P}:settings``; every
  instance reloads the overrides and re-arms its timers.

A graceful stop marks this instance dead, so the others take its conversations over at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from gateway.errors import StoreError
from gateway.models import StoredEvent, contact_id_of
from gateway.sessions.ownership import OwnershipHost, SettingsListener
from gateway.sessions.state import OutboxSink
from gateway.store import redis_lease_scripts as lua
from gateway.store.redis import RedisStore, redis_client
from gateway.store.redis_calls import CALL_TIMEOUT_S, LEASE_TTL_MS, OperatorCalls, QuietLog
from gateway.store.sqlite_rows import event_from_json

log = logging.getLogger("gateway.ownership")

HEARTBEAT_EVERY_S = 0.2
SWEEP_EVERY_S = 0.25
RELEASE_EVERY_S = 0.5
ADOPT_CHUNK = 500
OVERDUE_GRACE_S = 1.0  # the deadline sweep's margin: a live owner closes within 100 ms
WAKE_BLOCK_MS = 500
RELEASE_BATCH = 1000


@dataclass(slots=True)
class _Held:
    """A conversation this instance holds: the lease token, and the last ``seq`` queued."""

    token: str
    seen: int = 0
    loading: asyncio.Future[None] | None = field(default=None)


@dataclass(slots=True)
class OwnershipStats:
    """Counters for tests and benchmarks."""

    adopted: int = 0  # conversations taken over from dead instances (or orphaned)
    released: int = 0
    lapsed_heartbeats: int = 0


class RedisOwnership(OperatorCalls):
    """Conversation ownership over the ``RedisStore`` it is given (see the module docstring)."""

    owns_everything = False
    stores_deadlines = True

    def __init__(self, store: RedisStore, *, instance_id: str | None = None) -> None:
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        store.instance_id = self.instance_id
        self._store = store
        self._keys = store.keys
        self._held: dict[str, _Held] = {}
        self._candidates: dict[str, tuple[str, str]] = {}  # contact -> (endpoint, conversation)
        self._host: OwnershipHost | None = None
        self._outbox: OutboxSink | None = None
        self._on_settings: SettingsListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[None]] = set()
        self._blocking: Any = None  # a client for blocking reads (XREAD, BLPOP, pub/sub)
        self._beat_at = -math.inf  # loop time of the last heartbeat Redis took
        self._closed = False
        self.stats = OwnershipStats()
        self.forwarded_calls = 0  # operator actions sent to other instances
        self._quiet = QuietLog()

    def __repr__(self) -> str:
        return f"<RedisOwnership {self.instance_id} holds={len(self._held)}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register this instance (first heartbeat) and keep beating."""
        client = self._store.client
        self._heartbeat = client.register_script(lua.HEARTBEAT)
        self._dead = client.register_script(lua.DEAD)
        self._adopt = client.register_script(lua.ADOPT)
        self._orphans = client.register_script(lua.ORPHANS)
        self._acquire = client.register_script(lua.ACQUIRE)
        self._release = client.register_script(lua.RELEASE)
        self._blocking = redis_client(self._store.url, socket_timeout_s=CALL_TIMEOUT_S + 2.0, max_connections=64)
        await self._beat()
        self._spawn(self._beat_forever(), "heartbeat")
        log.info("instance %s joined (key prefix %s)", self.instance_id, self._keys.prefix)

    def bind(self, host: OwnershipHost, outbox: OutboxSink, on_settings: SettingsListener) -> None:
        """Start taking conversations over, reading the wake stream and listening for settings."""
        self._host, self._outbox, self._on_settings = host, outbox, on_settings
        self._spawn(self._read_wakes(), "wakes")
        self._spawn(self._sweep_forever(), "sweeper")
        self._spawn(self._release_forever(), "releaser")
        self._spawn(self._listen_settings(), "settings")

    async def aclose(self) -> None:
        """Stop; mark this instance dead so the others take its conversations over now."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._tasks, *self._calls]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._store.client.zadd(self._keys.instances, {self.instance_id: 0})
        except (RedisError, OSError, StoreError):
            log.warning("could not mark instance %s as gone; others take over after its lease", self.instance_id)
        if self._blocking is not None:
            await self._blocking.aclose()

    def problem(self) -> str | None:
        """Why this instance cannot do its part: its heartbeat is stale (others may be taking
        its conversations over). Redis itself is probed by ``RedisStore.check_writable``."""
        age = asyncio.get_running_loop().time() - self._beat_at
        if age < LEASE_TTL_MS / 1000:
            return None
        return f"this instance's heartbeat is {age:.1f} s old (lease {LEASE_TTL_MS / 1000:g} s)"

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        self._tasks.append(asyncio.ensure_future(work))
        self._tasks[-1].set_name(f"ownership-{name}")

    async def _beat(self) -> None:
        now_ms, previous = await self._store._call(self._heartbeat(keys=[], args=[self._keys.prefix, self.instance_id]))
        if previous and int(now_ms) - float(previous) > LEASE_TTL_MS:
            # Others may have taken conversations over meanwhile: fencing refuses our writes to
            # those, and the session manager forgets each one as its write is refused.
            self.stats.lapsed_heartbeats += 1
            log.warning("instance %s: heartbeat lapsed %d ms", self.instance_id, int(now_ms) - float(previous))
        elif not previous and self._beat_at > -math.inf:
            self.stats.lapsed_heartbeats += 1
            log.warning("instance %s: Redis had lost this instance (restarted without its data?)", self.instance_id)
        self._beat_at = asyncio.get_running_loop().time()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            await self._quiet.run(self._beat(), "heartbeat")

    # -- events of owned conversations -----------------------------------------------------------

    async def admit(self, stored: StoredEvent) -> list[StoredEvent]:
        """An event accepted here for a conversation this instance owns; the events to queue now."""
        contact = contact_id_of(stored.endpoint, stored.event.conversation)
        token = self._store.leases.get(contact, "")
        held = self._held.get(contact)
        if held is None or held.token != token:  # newly ours: load what it has
            await self._take_over([contact], [token])
            return []  # queued by the takeover, this event included
        return await self._next(contact, held, stored)

    async def _next(self, contact: str, held: _Held, stored: StoredEvent) -> list[StoredEvent]:
        if held.loading is not None:
            await asyncio.shield(held.loading)
        if stored.seq <= held.seen:
            return []  # queued already (by a takeover's load or a fill)
        if stored.seq == held.seen + 1:
            held.seen = stored.seq
            return [stored]
        return await self._fill(contact, held)

    async def _fill(self, contact: str, held: _Held) -> list[StoredEvent]:
        """The conversation's pending events after ``held.seen``, in order (some were accepted by
        other instances and their wakes are still on the way)."""
        ids = await self._store._call(self._store.client.lrange(self._keys.pending(contact), 0, -1))
        events = sorted(await self._store._events(ids), key=lambda e: e.seq)
        if self._held.get(contact) is not held:
            return []
        queued = [e for e in events if e.seq > held.seen]  # no await from here: no double queueing
        if queued:
            held.seen = queued[-1].seq
        return queued

    def holds(self, endpoint: str, conversation: str) -> bool:
        contact = contact_id_of(endpoint, conversation)
        return self._holding(contact, self._store.leases.get(contact))

    def _holding(self, contact: str, token: str | None) -> bool:
        held = self._held.get(contact)
        return held is not None and held.token == token

    def forgotten(self, endpoint: str, conversation: str) -> None:
        self._candidates[contact_id_of(endpoint, conversation)] = (endpoint, conversation)

    async def deadlines_moved(self, deadlines: list[tuple[str, float | None]]) -> None:
        await self._store.set_deadlines(deadlines)

    async def settings_changed(self) -> None:
        await self._store._call(self._store.client.publish(self._keys.settings_channel, self.instance_id))

    # -- takeover --------------------------------------------------------------------------------

    async def _take_over(self, contacts: list[str], tokens: list[str]) -> None:
        """The conversations are ours now (with these lease tokens): load and hand them over."""
        if self._host is None or self._outbox is None:
            return
        loading: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fresh: list[_Held] = []
        for contact, token in zip(contacts, tokens, strict=True):
            self._store.leases[contact] = token
            self._held[contact] = held = _Held(token, loading=loading)
            fresh.append(held)
        try:
            states = await self._store.load_conversations(contacts)
            for held, state in zip(fresh, states, strict=True):
                held.seen = max((e.seq for e in state.events), default=0)
            await self._host.adopt(
                [s.session for s in states if s.session is not None], [e for s in states for e in s.events]
            )
            self._outbox.submit([m for s in states for m in s.outbox])
            for state in states:
                if state.session is None and not state.events and not state.outbox:
                    endpoint, _, conversation = state.contact_id.partition(":")
                    self.forgotten(endpoint, conversation)  # nothing here: the lease may go back
        except BaseException:
            for contact, held in zip(contacts, fresh, strict=True):
                if self._held.get(contact) is held:
                    del self._held[contact]  # the next event or sweep tries again
            raise
        finally:
            for held in fresh:
                held.loading = None
            loading.set_result(None)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            await self._quiet.run(self._sweep(), "sweep")

    async def _sweep(self) -> None:
        """Adopt the conversations of dead instances, then orphaned overdue sessions."""
        call = self._store._call
        for dead in await call(self._dead(keys=[], args=[self._keys.prefix, str(LEASE_TTL_MS)])):
            if dead == self.instance_id:
                continue  # our own heartbeat lapsed: it beats again, fencing guards meanwhile
            while True:
                args = [self._keys.prefix, dead, self.instance_id, str(LEASE_TTL_MS), str(ADOPT_CHUNK)]
                out = await call(self._adopt(keys=[], args=args))
                if out[0] == "alive":
                    break
                if len(out) > 1:
                    await self._take_over(out[1::2], out[2::2])
                    self.stats.adopted += len(out) // 2
                    log.info("took over %d conversations of instance %s", len(out) // 2, dead)
                if out[0] == "done":
                    break
        overdue = time.time() - OVERDUE_GRACE_S
        ids = await call(self._store.client.zrangebyscore(self._keys.deadlines, "-inf", overdue, start=0, num=100))
        if ids:
            args = [self._keys.prefix, self.instance_id, str(LEASE_TTL_MS), *ids]
            out = await call(self._orphans(keys=[], args=args))
            if out:
                await self._take_over(out[0::2], out[1::2])
                self.stats.adopted += len(out) // 2
                log.info("took over %d orphaned conversations with overdue sessions", len(out) // 2)

    async def _release_forever(self) -> None:
        while True:
            await asyncio.sleep(RELEASE_EVERY_S)
            await self._quiet.run(self._release_some(), "release")

    async def _release_some(self) -> None:
        """Give back the leases of conversations with nothing left here."""
        if not self._candidates or self._host is None:
            return
        batch: list[tuple[str, str]] = []
        for contact, (endpoint, conversation) in list(self._candidates.items())[:RELEASE_BATCH]:
            token = self._store.leases.get(contact)
            if self._host.has_conversation(endpoint, conversation) or token is None:
                del self._candidates[contact]  # busy again (forgotten again later), or not ours
                continue
            batch.append((contact, token))
        if not batch:
            return
        args = [self._keys.prefix, self.instance_id, *(x for pair in batch for x in pair)]
        statuses = await self._store._call(self._release(keys=[], args=args))
        for (contact, token), status in zip(batch, statuses, strict=True):
            if status == "busy":
                continue  # a message still to send, say: try again later
            self._candidates.pop(contact, None)
            if self._store.leases.get(contact) == token:
                del self._store.leases[contact]
            held = self._held.get(contact)
            if held is not None and held.token == token:
                del self._held[contact]
            if status == "released":
                self.stats.released += 1

    # -- the wake stream: events accepted elsewhere, forwarded operator actions -------------------

    async def _read_wakes(self) -> None:
        key = self._keys.wake(self.instance_id)
        last = "0-0"
        while True:
            try:
                answer = await self._blocking.xread({key: last}, count=500, block=WAKE_BLOCK_MS)
                for _stream, entries in answer or ():
                    for entry_id, entry in entries:
                        last = entry_id
                        await self._wake(entry)
                    await self._blocking.xtrim(key, minid=last)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._quiet.note("reading the wake stream", exc)
                await asyncio.sleep(0.5)

    async def _wake(self, entry: dict[str, str]) -> None:
        kind = entry.get("kind")
        if kind == "call":
            task = asyncio.create_task(self._serve_call(entry))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            return
        contact = entry["contact"]
        held = self._held.get(contact)
        if held is None or self._host is None:
            return  # not ours (any more): its new owner loads its pending state
        if kind == "outbox":
            states = await self._store.load_conversations([contact])
            if self._outbox is not None:
                self._outbox.submit(states[0].outbox)
            return
        stored = StoredEvent(
            int(entry["id"]),
            entry["endpoint"],
            float(entry["arrival_at"]),
            event_from_json(entry["payload"]),
            seq=int(entry["seq"]),
        )
        self._host.enqueue(await self._next(contact, held, stored))

    # -- runtime settings ------------------------------------------------------------------------

    async def _listen_settings(self) -> None:
        """Apply runtime settings changed through other instances (and, after a lost connection,
        whatever may have changed meanwhile)."""
        missed = False
        while True:
            try:
                pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(self._keys.settings_channel)
                    if missed and self._on_settings is not None:
                        await self._on_settings()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and message["data"] != self.instance_id and self._on_settings:
                            await self._on_settings()
                finally:
                    await pubsub.aclose()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._quiet.note("listening for settings changes", exc)
                missed = True
                await asyncio.sleep(0.5)
