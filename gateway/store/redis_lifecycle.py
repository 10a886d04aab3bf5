"""The Redis store's data lifecycle (``RedisLifecycle``, a base of ``RedisStore``): retention,
erasure, dead-letter deletion and the web chat's issued conversations, each write a script of
``redis_retention_scripts`` sent through the store's writer (in order with the other writes)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from gateway.errors import StoreError
from gateway.models import contact_id_of
from gateway.store import redis_codec as codec
from gateway.store import redis_retention_scripts as lua
from gateway.store.redis_reads import RedisReads

DELETE_CHUNK = 2000  # rows per script while pruning: other writes interleave


class RedisLifecycle(RedisReads):
    """Retention and erasure on Redis; ``RedisStore`` provides the writer."""

    def _write(self, script: AsyncScript, args: list[str]) -> asyncio.Future[Any]:
        raise NotImplementedError

    def _prune_held_chunk(self, before: float, holding_channels: Collection[str], limit: int) -> asyncio.Future[Any]:
        raise NotImplementedError

    def _register_lifecycle_scripts(self, client: aioredis.Redis) -> None:
        self._prune_done_inbound = client.register_script(lua.PRUNE_DONE_INBOUND)
        self._prune_secrets = client.register_script(lua.PRUNE_SECRETS)
        self._prune_closed = client.register_script(lua.PRUNE_CLOSED_SESSIONS)
        self._prune_done_outbox = client.register_script(lua.PRUNE_DONE_OUTBOX)
        self._prune_idle_contacts = client.register_script(lua.PRUNE_IDLE_CONTACTS)
        self._delete_dead = client.register_script(lua.DELETE_DEAD_LETTER)
        self._erase = client.register_script(lua.ERASE_CONTACT)
        self._add_secret = client.register_script(lua.ADD_SECRET)

    async def _until_short(self, script: AsyncScript, cutoff: float) -> int:
        """Run a bounded delete script until a call deletes less than a chunk."""
        total = 0
        while True:
            removed = int(
                await self._call(self._write(script, [self.keys.prefix, codec.number(cutoff), str(DELETE_CHUNK)]))
            )
            total += removed
            if removed < DELETE_CHUNK:
                return total

    # -- issued conversations (web chat) ---------------------------------------------------------

    async def add_conversation_secret(
        self, endpoint: str, conversation: str, secret_hash: str, created_at: float
    ) -> None:
        """Record an issued conversation and its secret's hash; StoreError if it exists already."""
        args = [self.keys.prefix, contact_id_of(endpoint, conversation), secret_hash, codec.number(created_at)]
        if not int(await self._call(self._write(self._add_secret, args))):
            raise StoreError(f"conversation {endpoint}:{conversation} was issued already")

    async def conversation_secret(self, endpoint: str, conversation: str) -> str | None:
        """The secret hash of an issued conversation, or None."""
        value = await self._call(self.client.get(self.keys.secret(contact_id_of(endpoint, conversation))))
        return None if value is None else str(value)

    # -- retention -------------------------------------------------------------------------------

    async def prune(self, before: float, *, holding_channels: Collection[str]) -> int:
        """Delete handled inbound events that arrived before ``before``, messages still pending
        for ``holding_channels`` created before it, and issued conversations created before it
        that never had a session; returns the number of rows deleted. Dedup ids expire by
        themselves (their TTL is the same window)."""
        total = await self._until_short(self._prune_done_inbound, before)
        while True:
            removed = int(await self._call(self._prune_held_chunk(before, holding_channels, DELETE_CHUNK)))
            total += removed
            if removed < DELETE_CHUNK:
                break
        offset = 0
        while True:
            args = [self.keys.prefix, codec.number(before), str(offset), str(DELETE_CHUNK)]
            removed, scanned = (int(n) for n in await self._call(self._write(self._prune_secrets, args)))
            total += removed
            if scanned < DELETE_CHUNK:
                return total
            offset += scanned - removed  # the kept ones stay in the index: skip them

    async def prune_history(self, *, closed_sessions_before: float, messages_before: float) -> int:
        """Retention of closed sessions, contacts left without sessions (opted-out ones stay),
        and sent or skipped messages, a chunk per script; returns the rows deleted."""
        total = await self._until_short(self._prune_closed, closed_sessions_before)
        cursor = 0
        while True:
            cursor, ids = await self._call(self.client.sscan(self.keys.contacts, cursor, count=DELETE_CHUNK))
            if ids:
                args = [self.keys.prefix, codec.number(closed_sessions_before), *ids]
                total += int(await self._call(self._write(self._prune_idle_contacts, args)))
            if int(cursor) == 0:
                break
        return total + await self._until_short(self._prune_done_outbox, messages_before)

    # -- deletes ---------------------------------------------------------------------------------

    async def delete_dead_letter(self, message_id: int) -> bool:
        """Delete outbox message ``message_id`` if it is a dead letter."""
        return bool(int(await self._call(self._write(self._delete_dead, [self.keys.prefix, str(message_id)]))))

    async def erase_contact(self, endpoint: str, conversation: str) -> int:
        """Delete the contact, its sessions, its conversation's outbox messages and handled
        inbound events, in one script; the number of rows deleted."""
        args = [self.keys.prefix, contact_id_of(endpoint, conversation)]
        return int(await self._call(self._write(self._erase, args)))
