"""The Redis store's Lua scripts: each state change is ONE script, so it is atomic and no other
instance's write interleaves (no read-modify-write race between instances).

Conventions: ``ARGV[1]`` is the key prefix (key names as in ``redis_keys``); times travel as
Python ``repr`` strings and are stored as given (Lua's own number-to-string conversion keeps only
14 digits), compared with ``tonumber``; a script validates everything before its first write,
because a script that fails halfway keeps the writes it made.
"""

from __future__ import annotations

# A Lua function the scripts that hand a conversation's lease to an instance begin with: the new
# owner gets a new fencing token ("<Redis seconds>.<INCR {P}:fence>", see redis_lease_scripts),
# recorded on the lease and in the owner's set. -> the token
GRANT_LEASE = """
local function grant_lease(P, me, contact, lease, seconds)
  local token = seconds..'.'..redis.call('INCR', P..':fence')
  redis.call('HSET', lease, 'owner', me, 'token', token)
  redis.call('SADD', P..':owned:'..me, contact)
  return token
end
"""

# add_inbound: the event durable (dedup id SET NX with the retention TTL, inbox hash, the
# conversation's pending list) and, in the same step, the deadline moves at acceptance (DESIGN.md
# "the fire/message race"): when the conversation's open session is not yet due at the arrival,
# its stored deadline moves to ``extends_to`` (and ``accepted_deadline`` remembers it until the
# owner's commit catches up). Then the route: a free lease is taken for ``me``; a lease of
# another instance gets the event on that instance's wake stream.
# ARGV: prefix, endpoint, dedup_key, contact, payload, arrival_at, interaction ('1'|''),
#       extends_to (''|time), me (''|instance id), retention_s
# -> {0} for a redelivery, else {id, seq, 'acquired'|'mine'|'forwarded', token|owner}
ADD_INBOUND = (
    GRANT_LEASE
    + """
local P = ARGV[1]
local contact = ARGV[4]
if not redis.call('SET', P..':dedup:'..ARGV[2]..':'..ARGV[3], '1', 'NX', 'EX', ARGV[10]) then
  return {0}
end
local id = redis.call('INCR', P..':seq:in')
local seq = redis.call('INCR', P..':cseq:'..contact)
redis.call('HSET', P..':in:'..id, 'endpoint', ARGV[2], 'contact', contact, 'payload', ARGV[5],
  'arrival_at', ARGV[6], 'state', 'pending', 'seq', seq)
redis.call('RPUSH', P..':pending:'..contact, id)
redis.call('ZADD', P..':pending', id, id)
redis.call('ZADD', P..':cin:'..contact, ARGV[6], id)
if ARGV[7] == '1' and ARGV[8] ~= '' then
  local sid = redis.call('GET', P..':open:'..contact)
  if sid then
    local d = redis.call('ZSCORE', P..':deadlines', sid)
    if d and tonumber(d) > tonumber(ARGV[6]) and tonumber(ARGV[8]) > tonumber(d) then
      redis.call('ZADD', P..':deadlines', ARGV[8], sid)
      redis.call('HSET', P..':s:'..sid, 'accepted_deadline', ARGV[8])
    end
  end
end
local me = ARGV[9]
if me == '' then return {id, seq, 'mine', ''} end
local lease = P..':lease:'..contact
local owner = redis.call('HGET', lease, 'owner')
if not owner then
  return {id, seq, 'acquired', grant_lease(P, me, contact, lease, redis.call('TIME')[1])}
end
if owner == me then return {id, seq, 'mine', redis.call('HGET', lease, 'token')} end
redis.call('XADD', P..':wake:'..owner, 'MAXLEN', '~', '100000', '*', 'kind', 'event', 'contact', contact,
  'seq', seq, 'id', id, 'endpoint', ARGV[2], 'arrival_at', ARGV[6], 'payload', ARGV[5])
return {id, seq, 'forwarded', owner}
"""
)

# commit: a models.Change as one JSON document (ARGV[2]; see RedisStore.commit).
# 1. fences: every [contact, token] must still be the conversation's lease, else nothing is
#    written ('LEASE <contact>' error).
# 2. one open session per conversation, checked in order before any write ('CONFLICT' error).
# 3. closes: the close claim, one per session: still open, its lease still ours (per close, so
#    one lost conversation does not fail a batch), and for inactivity the stored deadline due
#    (<= now + tol). A refused claim writes nothing and its closure notice is not queued.
# 4. sessions, contacts, outbox (idempotent on the key), handled events, outbox updates, notices.
# -> {outbox ids (0 where skipped), {session id, 'moved'|'gone', deadline|'' ...}}
COMMIT = """
local P = ARGV[1]
local c = cjson.decode(ARGV[2])
local now = tonumber(c.now)
local function lease_token(contact) return redis.call('HGET', P..':lease:'..contact, 'token') end
for _, f in ipairs(c.fence) do
  if lease_token(f[1]) ~= f[2] then return redis.error_reply('LEASE '..f[1]) end
end
local open = {}
local function open_of(contact)
  local v = open[contact]
  if v == nil then v = redis.call('GET', P..':open:'..contact) or false; open[contact] = v end
  return v
end
local states = {}
for _, s in ipairs(c.sessions) do
  local cur = states[s.id]
  if cur == nil then cur = redis.call('HGET', P..':s:'..s.id, 'state') or false end
  if s.state == 'open' then
    if cur ~= 'closed' then
      local o = open_of(s.contact)
      if o and o ~= s.id then
        return redis.error_reply('CONFLICT conversation '..s.contact..' has another open session')
      end
      open[s.contact] = s.id
      states[s.id] = 'open'
    end
  else
    if open_of(s.contact) == s.id then open[s.contact] = false end
    states[s.id] = 'closed'
  end
end

local function closed_index(key, sid)
  local at = redis.call('HGET', key, 'closed_at')
  if at then redis.call('ZADD', P..':closed', at, sid) end
end
local function done_index(okey, id, state)
  if state == 'sent' or state == 'skipped' then
    redis.call('ZADD', P..':odone', redis.call('HGET', okey, 'created_at'), id)
  else
    redis.call('ZREM', P..':odone', id)
  end
end

local refused = {}
local skip = {}
for _, s in ipairs(c.closes) do
  local key = P..':s:'..s.id
  local cur = redis.call('HGET', key, 'state')
  local dl = redis.call('ZSCORE', P..':deadlines', s.id)
  local verdict = nil
  if cur ~= 'open' or (s.token ~= '' and lease_token(s.contact) ~= s.token) then
    verdict = 'gone'
  elseif s.reason == 'inactivity' and (not dl or tonumber(dl) > now + tonumber(c.tol)) then
    verdict = 'moved'
  end
  if verdict then
    refused[#refused + 1] = s.id
    refused[#refused + 1] = verdict
    refused[#refused + 1] = dl or ''
    skip['close:'..s.id] = true
  else
    redis.call('HSET', key, unpack(s.set))
    if #s.del > 0 then redis.call('HDEL', key, unpack(s.del)) end
    local okey = P..':open:'..s.contact
    if redis.call('GET', okey) == s.id then redis.call('DEL', okey) end
    redis.call('ZREM', P..':deadlines', s.id)
    redis.call('SREM', P..':open_ids', s.id)
    closed_index(key, s.id)
  end
end

for _, s in ipairs(c.sessions) do
  local key = P..':s:'..s.id
  local cur = redis.call('HGET', key, 'state')
  if not (s.state == 'open' and cur == 'closed') then
    if not cur then
      redis.call('ZADD', P..':sessions', s.started_at, s.id)
      redis.call('ZADD', P..':sessions:'..s.endpoint, s.started_at, s.id)
      redis.call('ZADD', P..':cs:'..s.contact, s.started_at, s.id)
    end
    redis.call('HSET', key, unpack(s.set))
    if #s.del > 0 then redis.call('HDEL', key, unpack(s.del)) end
    local okey = P..':open:'..s.contact
    if s.state == 'open' then
      redis.call('SET', okey, s.id)
      redis.call('SADD', P..':open_ids', s.id)
      if s.expires_at ~= '' then
        local d = s.expires_at
        local acc = redis.call('HGET', key, 'accepted_deadline')
        if acc and tonumber(acc) > tonumber(d) then d = acc else redis.call('HDEL', key, 'accepted_deadline') end
        redis.call('ZADD', P..':deadlines', d, s.id)
      else
        redis.call('ZREM', P..':deadlines', s.id)
        redis.call('HDEL', key, 'accepted_deadline')
      end
    else
      if redis.call('GET', okey) == s.id then redis.call('DEL', okey) end
      redis.call('ZREM', P..':deadlines', s.id)
      redis.call('SREM', P..':open_ids', s.id)
      redis.call('HDEL', key, 'accepted_deadline')
      closed_index(key, s.id)
    end
  end
end

for _, k in ipairs(c.contacts) do
  redis.call('SET', P..':c:'..k[1], k[2])
  redis.call('SADD', P..':contacts', k[1])
end

local ids = {}
for i, m in ipairs(c.outbox) do
  if skip[m.key] then
    ids[i] = 0
  else
    local kk = P..':okey:'..m.key
    local id = redis.call('GET', kk)
    if not id then
      id = redis.call('INCR', P..':seq:out')
      redis.call('SET', kk, id)
      local okey = P..':o:'..id
      redis.call('HSET', okey, 'id', id, 'contact', m.contact, unpack(m.set))
      redis.call('ZADD', P..':cout:'..m.contact, redis.call('HGET', okey, 'created_at'), id)
      done_index(okey, id, m.state)
      if m.state == 'pending' then
        redis.call('ZADD', P..':opending', id, id)
        redis.call('SADD', P..':opend:'..m.contact, id)
      elseif m.state == 'dead' then
        redis.call('ZADD', P..':odead', id, id)
      end
    end
    ids[i] = tonumber(id)
  end
end

for _, id in ipairs(c.handled) do
  local ekey = P..':in:'..id
  local contact = redis.call('HGET', ekey, 'contact')
  if contact then
    redis.call('HSET', ekey, 'state', 'done')
    redis.call('ZADD', P..':done', redis.call('HGET', ekey, 'arrival_at'), id)
    redis.call('LREM', P..':pending:'..contact, 1, id)
  end
  redis.call('ZREM', P..':pending', id)
end

for _, u in ipairs(c.updates) do
  local okey = P..':o:'..u.id
  local contact = redis.call('HGET', okey, 'contact')
  if contact then
    redis.call('HSET', okey, unpack(u.set))
    if #u.del > 0 then redis.call('HDEL', okey, unpack(u.del)) end
    if u.state == 'pending' then
      redis.call('ZADD', P..':opending', u.id, u.id)
      redis.call('SADD', P..':opend:'..contact, u.id)
    else
      redis.call('ZREM', P..':opending', u.id)
      redis.call('SREM', P..':opend:'..contact, u.id)
    end
    if u.state == 'dead' then redis.call('ZADD', P..':odead', u.id, u.id) else redis.call('ZREM', P..':odead', u.id) end
    done_index(okey, u.id, u.state)
  end
end

for _, n in ipairs(c.notices) do
  local key = P..':s:'..n[1]
  if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'notice', n[2]) end
end
return {ids, refused}
"""

# parts_sent: only that field of an existing outbox message. ARGV: prefix, id, parts_sent
PARTS_SENT = """
local key = ARGV[1]..':o:'..ARGV[2]
if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'parts_sent', ARGV[3]) end
return 0
"""

# set_deadlines: the owner re-derived open sessions' deadlines (a changed setting, adoption).
# A deadline never drops below one an accepted, not yet handled message set (accepted_deadline).
# ARGV: prefix, then (session id, deadline|'') pairs -> the deadlines now stored ('' = none)
SET_DEADLINES = """
local P = ARGV[1]
local out = {}
for i = 2, #ARGV, 2 do
  local sid, d = ARGV[i], ARGV[i + 1]
  local key = P..':s:'..sid
  if redis.call('HGET', key, 'state') == 'open' then
    if d == '' then
      redis.call('ZREM', P..':deadlines', sid)
      redis.call('HDEL', key, 'expires_at', 'accepted_deadline')
    else
      local acc = redis.call('HGET', key, 'accepted_deadline')
      if acc and tonumber(acc) > tonumber(d) then d = acc end
      redis.call('HSET', key, 'expires_at', d)
      redis.call('ZADD', P..':deadlines', d, sid)
    end
  end
  out[#out + 1] = d
end
return out
"""

# prune: web chat messages still pending (nobody came back for them) created before ARGV[2], for
# channels ARGV[4..]; at most ARGV[3] per call. Dedup ids expire by TTL; handled inbound events,
# issued conversations and history go by redis_retention_scripts.
PRUNE_HELD = """
local P = ARGV[1]
local before = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local channels = {}
for i = 4, #ARGV do channels[ARGV[i]] = true end
local removed = 0
local ids = redis.call('ZRANGE', P..':opending', 0, -1)
for _, id in ipairs(ids) do
  if removed >= limit then break end
  local key = P..':o:'..id
  local f = redis.call('HMGET', key, 'channel', 'created_at', 'contact', 'key')
  if f[1] and channels[f[1]] and tonumber(f[2]) < before then
    redis.call('DEL', key, P..':okey:'..f[4])
    redis.call('ZREM', P..':opending', id)
    redis.call('SREM', P..':opend:'..f[3], id)
    redis.call('ZREM', P..':cout:'..f[3], id)
    removed = removed + 1
  end
end
return removed
"""
