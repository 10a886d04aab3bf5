"""The Lua scripts of several instances (``redis_ownership.py``): heartbeats, leases with fencing
tokens, takeover and release. Conventions as in ``redis_scripts``: ``ARGV[1]`` is the key prefix.
"""

from __future__ import annotations

from gateway.store.redis_scripts import GRANT_LEASE

# -- several instances (redis_ownership.py): leases with fencing tokens --------------------------
# Liveness is the instance's heartbeat in {P}:instances, in Redis's own clock (TIME), so the
# instances' clocks never matter. A conversation's lease is {owner, token}; every new owner gets
# a new token ("<Redis seconds>.<INCR {P}:fence>": unique even after a Redis that lost its data
# restarts the counter), which fences the old owner's writes (COMMIT's 'fence').
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# heartbeat: ARGV prefix, me -> {now_ms, previous heartbeat or ''}
HEARTBEAT = (
    _NOW_MS
    + """
local prev = redis.call('ZSCORE', ARGV[1]..':instances', ARGV[2])
redis.call('ZADD', ARGV[1]..':instances', now, ARGV[2])
return {now, prev or ''}
"""
)

# dead: ARGV prefix, ttl_ms -> instances whose heartbeat is older than ttl
DEAD = (
    _NOW_MS
    + """
return redis.call('ZRANGEBYSCORE', ARGV[1]..':instances', '-inf', '('..(now - tonumber(ARGV[2])))
"""
)

# adopt: a chunk of a dead instance's conversations moves to me, each with a new token.
# ARGV: prefix, dead, me, ttl_ms, count -> {'alive'} | {'ok'|'done', contact, token, ...}
ADOPT = (
    _NOW_MS
    + GRANT_LEASE
    + """
local P, dead, me = ARGV[1], ARGV[2], ARGV[3]
local score = redis.call('ZSCORE', P..':instances', dead)
if score and tonumber(score) >= now - tonumber(ARGV[4]) then return {'alive'} end
local owned = P..':owned:'..dead
local out = {'ok'}
for _, contact in ipairs(redis.call('SRANDMEMBER', owned, tonumber(ARGV[5]))) do
  redis.call('SREM', owned, contact)
  local lease = P..':lease:'..contact
  if redis.call('HGET', lease, 'owner') == dead then
    out[#out + 1] = contact
    out[#out + 1] = grant_lease(P, me, contact, lease, t[1])
  end
end
if redis.call('SCARD', owned) == 0 then
  redis.call('DEL', owned, P..':wake:'..dead)
  redis.call('ZREM', P..':instances', dead)
  out[1] = 'done'
end
return out
"""
)

# orphans: overdue open sessions whose conversation has no live owner move to me (the deadline
# sweep; a dead instance's conversations normally move by ADOPT first).
# ARGV: prefix, me, ttl_ms, session ids... -> {contact, token, ...}
ORPHANS = (
    _NOW_MS
    + GRANT_LEASE
    + """
local P, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV do
  local sid = ARGV[i]
  local f = redis.call('HMGET', P..':s:'..sid, 'endpoint', 'conversation', 'state')
  if f[3] ~= 'open' then
    redis.call('ZREM', P..':deadlines', sid)
  else
    local contact = f[1]..':'..f[2]
    local lease = P..':lease:'..contact
    local owner = redis.call('HGET', lease, 'owner')
    local alive = false
    if owner then
      local seen = redis.call('ZSCORE', P..':instances', owner)
      alive = seen and tonumber(seen) >= now - ttl
    end
    if not alive then
      if owner then redis.call('SREM', P..':owned:'..owner, contact) end
      out[#out + 1] = contact
      out[#out + 1] = grant_lease(P, me, contact, lease, t[1])
    end
  end
end
return out
"""
)

# acquire: the route of an admin action. ARGV: prefix, me, ttl_ms, contact
# -> {'acquired'|'mine', token} | {'other'|'dead', owner}
ACQUIRE = (
    _NOW_MS
    + GRANT_LEASE
    + """
local P, me, contact = ARGV[1], ARGV[2], ARGV[4]
local lease = P..':lease:'..contact
local owner = redis.call('HGET', lease, 'owner')
if not owner then
  return {'acquired', grant_lease(P, me, contact, lease, t[1])}
end
if owner == me then return {'mine', redis.call('HGET', lease, 'token')} end
local seen = redis.call('ZSCORE', P..':instances', owner)
if seen and tonumber(seen) >= now - tonumber(ARGV[3]) then return {'other', owner} end
return {'dead', owner}
"""
)

# release: leases of conversations with nothing left (no pending event, no open session, no
# pending message) go back. ARGV: prefix, me, (contact, token)... -> 'released'|'busy'|'lost' each
RELEASE = """
local P, me = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local contact, token = ARGV[i], ARGV[i + 1]
  local lease = P..':lease:'..contact
  if redis.call('HGET', lease, 'token') ~= token then
    out[#out + 1] = 'lost'
  elseif redis.call('LLEN', P..':pending:'..contact) > 0 or redis.call('EXISTS', P..':open:'..contact) == 1
      or redis.call('SCARD', P..':opend:'..contact) > 0 then
    out[#out + 1] = 'busy'
  else
    redis.call('DEL', lease, P..':cseq:'..contact)
    redis.call('SREM', P..':owned:'..me, contact)
    out[#out + 1] = 'released'
  end
end
return out
"""
