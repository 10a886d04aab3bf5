"""The Redis store's Lua scripts for retention, erasure and issued conversations (the
``Store`` methods of data lifecycle and the public web chat). Conventions as in
``redis_scripts``: ``ARGV[1]`` is the key prefix, times are Python ``repr`` strings, and every
script checks a row's condition again before deleting it (another instance may have changed it).
Each bounded script deletes at most ``limit`` rows a call, so other writes interleave.
"""

from __future__ import annotations

# Deleting one row and every index entry naming it (shared by the scripts below).
_DELETE = """
local P = ARGV[1]
local function delete_session(sid)
  local key = P..':s:'..sid
  local f = redis.call('HMGET', key, 'endpoint', 'conversation', 'state')
  if not f[1] then return 0 end
  local contact = f[1]..':'..f[2]
  if f[3] == 'open' and redis.call('GET', P..':open:'..contact) == sid then redis.call('DEL', P..':open:'..contact) end
  redis.call('DEL', key)
  redis.call('ZREM', P..':sessions', sid)
  redis.call('ZREM', P..':sessions:'..f[1], sid)
  redis.call('ZREM', P..':cs:'..contact, sid)
  redis.call('ZREM', P..':closed', sid)
  redis.call('ZREM', P..':deadlines', sid)
  redis.call('SREM', P..':open_ids', sid)
  return 1
end
local function delete_outbound(id)
  local key = P..':o:'..id
  local f = redis.call('HMGET', key, 'contact', 'key')
  if not f[1] then return 0 end
  redis.call('DEL', key)
  if f[2] then redis.call('DEL', P..':okey:'..f[2]) end
  redis.call('ZREM', P..':opending', id)
  redis.call('ZREM', P..':odead', id)
  redis.call('ZREM', P..':odone', id)
  redis.call('SREM', P..':opend:'..f[1], id)
  redis.call('ZREM', P..':cout:'..f[1], id)
  return 1
end
local function delete_inbound(id)
  local key = P..':in:'..id
  local contact = redis.call('HGET', key, 'contact')
  redis.call('ZREM', P..':done', id)
  if not contact then return 0 end
  redis.call('DEL', key)
  redis.call('ZREM', P..':cin:'..contact, id)
  return 1
end
"""

# Handled inbound events (dedup window) that arrived before ARGV[2]; at most ARGV[3].
PRUNE_DONE_INBOUND = (
    _DELETE
    + """
local removed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..':done', '-inf', '('..ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))) do
  if redis.call('HGET', P..':in:'..id, 'state') ~= 'pending' then removed = removed + delete_inbound(id) end
end
return removed
"""
)

# Issued conversations created before ARGV[2] that never had a session; ARGV[3] offset, ARGV[4]
# limit into the creation index -> {deleted, scanned}.
PRUNE_SECRETS = """
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P..':secrets', '-inf', '('..ARGV[2],
  'LIMIT', tonumber(ARGV[3]), tonumber(ARGV[4]))
local removed = 0
for _, contact in ipairs(ids) do
  if redis.call('EXISTS', P..':cs:'..contact) == 0 then
    redis.call('DEL', P..':secret:'..contact)
    redis.call('ZREM', P..':secrets', contact)
    removed = removed + 1
  end
end
return {removed, #ids}
"""

# Closed sessions closed before ARGV[2]; at most ARGV[3].
PRUNE_CLOSED_SESSIONS = (
    _DELETE
    + """
local removed = 0
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P..':closed', '-inf', '('..ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))) do
  if redis.call('HGET', P..':s:'..sid, 'state') == 'closed' then
    removed = removed + delete_session(sid)
  else
    redis.call('ZREM', P..':closed', sid)
  end
end
return removed
"""
)

# Sent and skipped messages created before ARGV[2]; at most ARGV[3].
PRUNE_DONE_OUTBOX = (
    _DELETE
    + """
local removed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', P..':odone', '-inf', '('..ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))) do
  local state = redis.call('HGET', P..':o:'..id, 'state')
  if state == 'sent' or state == 'skipped' then
    removed = removed + delete_outbound(id)
  else
    redis.call('ZREM', P..':odone', id)
  end
end
return removed
"""
)

# Contacts among ARGV[3..] with no session, not opted out, silent (last user message, else
# creation) since before ARGV[2].
PRUNE_IDLE_CONTACTS = """
local P = ARGV[1]
local cutoff = tonumber(ARGV[2])
local removed = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local text = redis.call('GET', P..':c:'..id)
  if not text then
    redis.call('SREM', P..':contacts', id)
  elseif redis.call('EXISTS', P..':cs:'..id) == 0 then
    local c = cjson.decode(text)
    local last = c.last_user_message_at
    if last == nil or last == cjson.null then last = c.created_at end
    if not c.opted_out and tonumber(last) < cutoff then
      redis.call('DEL', P..':c:'..id)
      redis.call('SREM', P..':contacts', id)
      removed = removed + 1
    end
  end
end
return removed
"""

# A dead letter deleted (DELETE /admin/dead-letters/<id>): ARGV[2] id -> 1, or 0 when it is not
# (or no longer) a dead letter.
DELETE_DEAD_LETTER = (
    _DELETE
    + """
if redis.call('HGET', P..':o:'..ARGV[2], 'state') ~= 'dead' then return 0 end
return delete_outbound(ARGV[2])
"""
)

# Erasure of a contact ARGV[2] (endpoint:conversation): its sessions, the contact, its
# conversation's outbox messages and handled inbound events (pending ones stay to be handled).
# -> rows deleted.
ERASE_CONTACT = (
    _DELETE
    + """
local contact = ARGV[2]
local removed = 0
for _, sid in ipairs(redis.call('ZRANGE', P..':cs:'..contact, 0, -1)) do removed = removed + delete_session(sid) end
redis.call('DEL', P..':cs:'..contact)
if redis.call('DEL', P..':c:'..contact) == 1 then removed = removed + 1 end
redis.call('SREM', P..':contacts', contact)
for _, id in ipairs(redis.call('ZRANGE', P..':cout:'..contact, 0, -1)) do removed = removed + delete_outbound(id) end
for _, id in ipairs(redis.call('ZRANGE', P..':cin:'..contact, 0, -1)) do
  if redis.call('HGET', P..':in:'..id, 'state') == 'done' then removed = removed + delete_inbound(id) end
end
return removed
"""
)

# An issued conversation: ARGV[2] contact id, ARGV[3] secret hash, ARGV[4] created_at -> 1, or
# 0 when the conversation was issued already.
ADD_SECRET = """
local P = ARGV[1]
if redis.call('SET', P..':secret:'..ARGV[2], ARGV[3], 'NX') == false then return 0 end
redis.call('ZADD', P..':secrets', ARGV[4], ARGV[2])
return 1
"""
