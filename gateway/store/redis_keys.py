"""The Redis store's key schema, in one place. Every key starts with ``<key_prefix>:`` (default
``gw``), so several gateways can share one Redis; ``Keys`` renders the templates for a prefix.

    {P}:s:{session_id}          hash    a session's fields (models.Session; None = field absent),
                                        plus ``accepted_deadline`` (see add_inbound.lua)
    {P}:open:{contact_id}       string  the id of the conversation's open session (one at most)
    {P}:sessions                zset    every session id, scored by started_at (newest-first pages)
    {P}:sessions:{endpoint}     zset    the same, per endpoint
    {P}:cs:{contact_id}         zset    the contact's sessions by started_at (its history, S6)
    {P}:deadlines               zset    open sessions that expire, scored by their deadline
    {P}:open_ids                set     every open session's id (restore)
    {P}:c:{contact_id}          string  a contact as JSON
    {P}:seq:in / {P}:seq:out    counter ids of inbound events / outbox messages
    {P}:in:{id}                 hash    an inbound event: endpoint, contact, payload, arrival_at,
                                        state (pending|done), seq; a done one is pruned (retention)
    {P}:dedup:{endpoint}:{key}  string  a dedup id, SET NX with the retention TTL (7 days)
    {P}:cseq:{contact_id}       counter the conversation's acceptance sequence (StoredEvent.seq)
    {P}:pending:{contact_id}    list    the conversation's pending inbound ids, in acceptance order
    {P}:pending                 zset    every pending inbound id (restore, pending_inbound)
    {P}:o:{id}                  hash    an outbox message (models.OutboundMessage) + contact
    {P}:okey:{key}              string  idempotency key -> outbox id
    {P}:opending                zset    pending outbox ids;  {P}:odead  zset  dead letters
    {P}:opend:{contact_id}      set     the conversation's pending outbox ids
    {P}:overrides               hash    runtime settings: scope -> JSON
    -- history and retention --
    {P}:cin:{contact_id}        zset    the conversation's inbound ids by arrival_at (transcripts)
    {P}:cout:{contact_id}       zset    the conversation's outbox ids by created_at (transcripts)
    {P}:done                    zset    handled inbound ids by arrival_at (pruned after dedup_days)
    {P}:odone                   zset    sent and skipped outbox ids by created_at (messages_days)
    {P}:closed                  zset    closed session ids by closed_at (closed_sessions_days)
    {P}:contacts                set     every contact id (idle contacts are pruned)
    {P}:secret:{contact_id}     string  an issued web chat conversation's secret hash
    {P}:secrets                 zset    issued conversations (contact ids) by creation time
    {P}:probe                   string  check_writable's write (expires after 10 s)
    -- several instances (gateway/store/redis_ownership.py) --
    {P}:instances               zset    live instances, scored by their last heartbeat (Redis ms)
    {P}:lease:{contact_id}      hash    the conversation's owner: owner (instance id), token
    {P}:fence                   counter fencing tokens
    {P}:owned:{instance}        set     the conversations an instance owns
    {P}:wake:{instance}         stream  events (and admin calls) for an instance's conversations
    {P}:reply:{uuid}            list    the answer to a forwarded admin call (expires)
    {P}:settings                channel "runtime settings changed" (pub/sub)

Scripts touch keys they build from the prefix, so the store needs one Redis (or a primary with
replicas), not Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Keys:
    """The key names under one prefix."""

    prefix: str

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:s:{session_id}"

    def open(self, contact_id: str) -> str:
        return f"{self.prefix}:open:{contact_id}"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    def endpoint_sessions(self, endpoint: str) -> str:
        return f"{self.prefix}:sessions:{endpoint}"

    def contact_sessions(self, contact_id: str) -> str:
        return f"{self.prefix}:cs:{contact_id}"

    @property
    def open_ids(self) -> str:
        return f"{self.prefix}:open_ids"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    def contact(self, contact_id: str) -> str:
        return f"{self.prefix}:c:{contact_id}"

    def inbound(self, event_id: int | str) -> str:
        return f"{self.prefix}:in:{event_id}"

    def pending(self, contact_id: str) -> str:
        return f"{self.prefix}:pending:{contact_id}"

    @property
    def all_pending(self) -> str:
        return f"{self.prefix}:pending"

    def outbound(self, message_id: int | str) -> str:
        return f"{self.prefix}:o:{message_id}"

    @property
    def outbox_pending(self) -> str:
        return f"{self.prefix}:opending"

    @property
    def outbox_dead(self) -> str:
        return f"{self.prefix}:odead"

    def conversation_outbox(self, contact_id: str) -> str:
        return f"{self.prefix}:opend:{contact_id}"

    @property
    def overrides(self) -> str:
        return f"{self.prefix}:overrides"

    def conversation_inbound(self, contact_id: str) -> str:
        return f"{self.prefix}:cin:{contact_id}"

    def conversation_outbound(self, contact_id: str) -> str:
        return f"{self.prefix}:cout:{contact_id}"

    @property
    def contacts(self) -> str:
        return f"{self.prefix}:contacts"

    def secret(self, contact_id: str) -> str:
        return f"{self.prefix}:secret:{contact_id}"

    @property
    def probe(self) -> str:
        return f"{self.prefix}:probe"

    @property
    def instances(self) -> str:
        return f"{self.prefix}:instances"

    def lease(self, contact_id: str) -> str:
        return f"{self.prefix}:lease:{contact_id}"

    def owned(self, instance: str) -> str:
        return f"{self.prefix}:owned:{instance}"

    def wake(self, instance: str) -> str:
        return f"{self.prefix}:wake:{instance}"

    def reply(self, token: str) -> str:
        return f"{self.prefix}:reply:{token}"

    @property
    def settings_channel(self) -> str:
        return f"{self.prefix}:settings"
