"""The Redis store's reads (``RedisReads``, a base of ``RedisStore``): plain commands, pipelined a
``CHUNK`` at a time, and the one place redis-py errors become ours (``_call``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.errors import LeaseLost, StoreError
from gateway.models import (
    Contact,
    EventKind,
    OutboundMessage,
    OutboxState,
    Session,
    StoredEvent,
    TranscriptEntry,
    TranscriptLine,
    contact_id_of,
)
from gateway.store import redis_codec as codec
from gateway.store.base import SessionQuery, decode_cursor, encode_cursor
from gateway.store.redis_keys import Keys
from gateway.store.sqlite_rows import event_from_json

T = TypeVar("T")

CHUNK = 1000  # ids per pipelined read
_USER_KINDS = (EventKind.MESSAGE.value, EventKind.POSTBACK.value)
_BOT_KINDS = ("reply", "closure", "bot")


@dataclass(slots=True)
class ConversationState:
    """What an instance taking over a conversation must load (``load_conversations``)."""

    contact_id: str
    session: Session | None
    events: list[StoredEvent] = field(default_factory=list)  # pending, in acceptance order
    outbox: list[OutboundMessage] = field(default_factory=list)  # pending, in id order


class RedisReads:
    """Reads of the Redis store; ``RedisStore`` provides ``keys`` and ``client``."""

    keys: Keys

    @property
    def client(self) -> aioredis.Redis:
        raise NotImplementedError

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        """Await a redis-py call; its errors become ``StoreError`` (``LeaseLost`` for a fence).

        Answers are text (``decode_responses``); redis-py types them loosely, hence ``Any``.
        """
        try:
            return await awaitable
        except ResponseError as exc:
            message = str(exc)
            if message.startswith("LEASE "):
                raise LeaseLost(message.removeprefix("LEASE ")) from exc
            raise StoreError(f"redis: {message}") from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis unavailable: {type(exc).__name__}: {exc}") from exc

    async def pending_inbound(self) -> list[StoredEvent]:
        """Every pending event, in id order."""
        ids = await self._call(self.client.zrange(self.keys.all_pending, 0, -1))
        return await self._events(ids)

    async def _events(self, ids: Sequence[str | int]) -> list[StoredEvent]:
        found: list[StoredEvent] = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for event_id in chunk:
                pipe.hgetall(self.keys.inbound(event_id))
            for event_id, raw in zip(chunk, await self._call(pipe.execute()), strict=True):
                if raw:
                    found.append(_stored_event(int(event_id), raw))
        return found

    # -- reads -----------------------------------------------------------------------------------

    async def _hashes(self, keys: Sequence[str], decode: Callable[[Any], T]) -> list[T]:
        """The hashes at ``keys`` that exist, decoded, ``CHUNK`` per pipelined round trip."""
        found: list[T] = []
        for start in range(0, len(keys), CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for key in keys[start : start + CHUNK]:
                pipe.hgetall(key)
            found += [decode(raw) for raw in await self._call(pipe.execute()) if raw]
        return found

    async def _sessions(self, ids: Sequence[str]) -> list[Session]:
        return await self._hashes([self.keys.session(session_id) for session_id in ids], codec.session_from)

    async def open_sessions(self) -> AsyncIterator[list[Session]]:
        """Every open session, about ``CHUNK`` at a time (in no particular order)."""
        cursor = 0
        while True:
            cursor, ids = await self._call(self.client.sscan(self.keys.open_ids, cursor, count=CHUNK))
            chunk = [session for session in await self._sessions(ids) if session.is_open]
            if chunk:
                yield chunk
            if cursor == 0:
                return

    async def get_session(self, session_id: str) -> Session | None:
        found = await self._sessions([session_id])
        return found[0] if found else None

    async def list_sessions(self, query: SessionQuery) -> tuple[list[Session], str | None]:
        """A page of sessions, newest first (started_at, then id), and the next page's cursor.

        Raises ValueError for a cursor this store did not produce.
        """
        after = decode_cursor(query.cursor) if query.cursor is not None else None
        key = self.keys.sessions if query.endpoint is None else self.keys.endpoint_sessions(query.endpoint)
        limit = max(1, query.limit)
        page: list[Session] = []
        offset = 0
        top = "+inf" if after is None else codec.number(after[0])
        while len(page) <= limit:
            read = self.client.zrevrangebyscore(key, top, "-inf", start=offset, num=CHUNK, withscores=True)
            chunk = await self._call(read)
            if not chunk:
                break
            offset += len(chunk)
            ids = [member for member, score in chunk if after is None or (score, member) < after]
            for session in await self._sessions(ids):
                if query.state is None or session.state is query.state:
                    page.append(session)
        if len(page) <= limit:
            return page, None
        return page[:limit], encode_cursor(page[limit - 1])

    async def get_contact(self, contact_id: str) -> Contact | None:
        return (await self.get_contacts([contact_id])).get(contact_id)

    async def get_contacts(self, contact_ids: list[str]) -> dict[str, Contact]:
        """The contacts that exist among ``contact_ids``, by id."""
        found: dict[str, Contact] = {}
        for start in range(0, len(contact_ids), CHUNK):
            chunk = contact_ids[start : start + CHUNK]
            texts = await self._call(self.client.mget([self.keys.contact(c) for c in chunk]))
            found.update({c: codec.contact_from_json(t) for c, t in zip(chunk, texts, strict=True) if t})
        return found

    async def contact_sessions(self, contact_id: str) -> list[Session]:
        """The contact's sessions (S6), newest first."""
        ids = await self._call(self.client.zrevrange(self.keys.contact_sessions(contact_id), 0, -1))
        return await self._sessions(ids)

    async def session_analytics(
        self, since: float | None, until: float | None
    ) -> list[tuple[str, bool, bool, str | None, int]]:
        """Sessions started in ``[since, until)`` counted by (endpoint, interactive, developer,
        close_reason), reading the started_at index a chunk at a time."""
        low = "-inf" if since is None else codec.number(since)
        high = "+inf" if until is None else f"({codec.number(until)}"
        counts: dict[tuple[str, bool, bool, str | None], int] = {}
        offset = 0
        index = self.keys.sessions
        while chunk := await self._call(self.client.zrangebyscore(index, low, high, start=offset, num=CHUNK)):
            offset += len(chunk)
            pipe = self.client.pipeline(transaction=False)
            for session_id in chunk:
                pipe.hmget(self.keys.session(session_id), ["endpoint", "interactive", "developer", "close_reason"])
            for endpoint, interactive, developer, reason in await self._call(pipe.execute()):
                if endpoint is not None:
                    group = (endpoint, interactive == "1", developer == "1", reason)
                    counts[group] = counts.get(group, 0) + 1
        return [(*group, n) for group, n in counts.items()]

    async def _outbound(self, ids: Sequence[str | int]) -> list[OutboundMessage]:
        return await self._hashes([self.keys.outbound(message_id) for message_id in ids], codec.outbound_from)

    async def pending_outbox(self, *, skip_channels: Collection[str] = ()) -> list[OutboundMessage]:
        """Messages still to send, in id order; none of ``skip_channels``."""
        found = await self._outbound(await self._call(self.client.zrange(self.keys.outbox_pending, 0, -1)))
        return [m for m in found if m.channel not in skip_channels] if skip_channels else found

    async def pending_outbox_of(self, endpoint: str, conversation: str) -> list[OutboundMessage]:
        """The conversation's pending messages, in id order."""
        ids = await self._call(
            self.client.smembers(self.keys.conversation_outbox(contact_id_of(endpoint, conversation)))
        )
        found = await self._outbound(sorted(ids, key=int))
        return [m for m in found if m.state is OutboxState.PENDING]

    async def count_dead_letters(self) -> int:
        return int(await self._call(self.client.zcard(self.keys.outbox_dead)))

    async def _conversation_rows(
        self, endpoint: str, conversation: str, low: str, high: str
    ) -> tuple[list[tuple[int, dict[str, str]]], list[OutboundMessage]]:
        """The conversation's inbound hashes (with ids) by arrival and outbox messages by
        creation, both with their time in ``[low, high]`` (Redis score bounds)."""
        contact = contact_id_of(endpoint, conversation)
        pipe = self.client.pipeline(transaction=False)
        pipe.zrangebyscore(self.keys.conversation_inbound(contact), low, high)
        pipe.zrangebyscore(self.keys.conversation_outbound(contact), low, high)
        inbound_ids, outbound_ids = await self._call(pipe.execute())
        inbound: list[tuple[int, dict[str, str]]] = []
        for start in range(0, len(inbound_ids), CHUNK):
            chunk = inbound_ids[start : start + CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for event_id in chunk:
                pipe.hgetall(self.keys.inbound(event_id))
            inbound += [(int(i), raw) for i, raw in zip(chunk, await self._call(pipe.execute()), strict=True) if raw]
        return inbound, await self._outbound(outbound_ids)

    async def history(self, endpoint: str, conversation: str, since: float, limit: int) -> list[TranscriptLine]:
        """The conversation's user lines and sent messages from ``since`` on, oldest first, the
        last ``limit`` (as ``sqlite_conversation.select_history``: same time, user first)."""
        inbound, outbound = await self._conversation_rows(endpoint, conversation, codec.number(since), "+inf")
        keyed: list[tuple[float, int, int, TranscriptLine]] = []
        for event_id, raw in inbound:
            event = json.loads(raw["payload"])
            kind, text = event["kind"], event.get("text")
            if (kind in _USER_KINDS and text is not None) or kind == EventKind.REFRESH.value:
                at = float(raw["arrival_at"])
                keyed.append((at, 0, event_id, TranscriptLine(at, "user", kind, text or "", event.get("message_id"))))
        for m in outbound:
            if m.state is OutboxState.SENT and m.kind.value in _BOT_KINDS:
                keyed.append((m.created_at, 1, m.id, TranscriptLine(m.created_at, "bot", m.kind.value, m.text)))
        keyed.sort(key=lambda k: k[:3])
        return [line for *_, line in keyed[-limit:]] if limit > 0 else []

    async def transcript(
        self, endpoint: str, conversation: str, since: float, until: float, limit: int
    ) -> list[TranscriptEntry]:
        """The conversation's messages in ``[since, until]``, oldest first, the newest ``limit``
        (as ``sqlite_conversation.select_transcript``)."""
        inbound, outbound = await self._conversation_rows(
            endpoint, conversation, codec.number(since), codec.number(until)
        )
        entries: list[TranscriptEntry] = []
        for _, raw in inbound:
            event = json.loads(raw["payload"])
            if event["kind"] not in _USER_KINDS:
                continue
            types = tuple(str(a.get("type", "file")) for a in event.get("attachments") or () if isinstance(a, dict))
            entries.append(
                TranscriptEntry(float(raw["arrival_at"]), "user", event["kind"], event.get("text"), attachments=types)
            )
        for m in outbound:
            entries.append(
                TranscriptEntry(m.created_at, "bot", m.kind.value, m.text, session_id=m.session_id, state=m.state.value)
            )
        entries.sort(key=lambda entry: entry.at)
        return entries[-limit:] if limit > 0 else []

    async def dead_letters(self, limit: int = 100) -> list[OutboundMessage]:
        """Messages given up on, newest first."""
        ids = await self._call(self.client.zrevrange(self.keys.outbox_dead, 0, max(1, limit) - 1))
        return await self._outbound(ids)

    async def get_outbound(self, message_id: int) -> OutboundMessage | None:
        found = await self._outbound([message_id])
        return found[0] if found else None

    async def get_overrides(self) -> dict[str, dict[str, Any]]:
        """scope -> runtime settings."""
        stored = await self._call(self.client.hgetall(self.keys.overrides))
        return {scope: json.loads(value) for scope, value in stored.items()}

    # -- several instances -----------------------------------------------------------------------

    async def load_conversations(self, contact_ids: Sequence[str]) -> list[ConversationState]:
        """The open session, pending events and pending outbox of each conversation (what an
        instance taking it over loads)."""
        pipe = self.client.pipeline(transaction=False)
        for contact in contact_ids:
            pipe.get(self.keys.open(contact))
            pipe.lrange(self.keys.pending(contact), 0, -1)
            pipe.smembers(self.keys.conversation_outbox(contact))
        raw = await self._call(pipe.execute())
        session_ids = [r for r in raw[0::3] if r]
        sessions = {s.id: s for s in await self._sessions(session_ids) if s.is_open}
        events: dict[str, list[StoredEvent]] = {}
        for stored in await self._events([i for ids in raw[1::3] for i in ids]):
            events.setdefault(contact_id_of(stored.endpoint, stored.event.conversation), []).append(stored)
        outbox: dict[str, list[OutboundMessage]] = {}
        for message in await self._outbound(sorted((i for ids in raw[2::3] for i in ids), key=int)):
            outbox.setdefault(contact_id_of(message.endpoint, message.conversation), []).append(message)
        states: list[ConversationState] = []
        for i, contact in enumerate(contact_ids):
            session = sessions.get(raw[3 * i]) if raw[3 * i] else None
            pending = sorted(events.get(contact, []), key=lambda e: e.seq)
            states.append(ConversationState(contact, session, pending, outbox.get(contact, [])))
        return states


def _stored_event(event_id: int, raw: dict[str, str]) -> StoredEvent:
    return StoredEvent(
        event_id,
        raw["endpoint"],
        float(raw["arrival_at"]),
        event_from_json(raw["payload"]),
        seq=int(raw.get("seq", "0")),
    )
