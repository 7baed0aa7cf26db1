"""The Lua scripts of `gateway.state.redis_store`: each runs atomically in Redis, on its clock."""

from __future__ import annotations

# KEYS: the buckets (a hash each; for a concurrency limit, replica -> requests it holds), the
# replicas' leases (a sorted set, replica -> until when it counts), then (when ARGV[1] is not
# empty) the key of this charge's id. ARGV: charge id, replica, lease seconds, then per bucket:
# unit (t: tokens, r: requests, c: concurrency), per_minute, burst, charge, need ('' = not
# checked). A charge whose id was seen already is not applied again: a call that timed out on
# the client may still run in Redis later, and is then replayed with the same id. A replica
# whose lease ran out counts no more, and its fields go. Returns: admitted (0/1), the longest
# wait in seconds, the index (from 1) of the bucket that refused or 0, 1 if this replica's
# lease had run out (its counts may be gone), then each bucket's level, as strings (Redis
# would truncate Lua numbers to integers).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op, replica, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = #KEYS - 1
if op ~= '' then n = n - 1 end
local leases = KEYS[n + 1]
local levels, rates, bursts = {}, {}, {}
local wait, refused, lapsed = 0, 0, 0
for i = 1, n do
  local j = 3 + 5 * (i - 1)
  local unit, rate, burst = ARGV[j + 1], tonumber(ARGV[j + 2]) / 60, tonumber(ARGV[j + 3])
  local level
  if unit == 'c' then
    if lapsed == 0 then
      local mine = tonumber(redis.call('ZSCORE', leases, replica))
      if mine == nil or mine < now then lapsed = 1 end
      redis.call('ZADD', leases, now + lease, replica)
    end
    local held = 0
    local v = redis.call('HGETALL', KEYS[i])
    for k = 1, #v, 2 do
      local until_ = tonumber(redis.call('ZSCORE', leases, v[k]))
      if v[k] ~= replica and (until_ == nil or until_ < now) then
        redis.call('HDEL', KEYS[i], v[k])
      else
        held = held + tonumber(v[k + 1])
      end
    end
    level = burst - held
  else
    local v = redis.call('HMGET', KEYS[i], 'level', 'stamp')
    level = tonumber(v[1]) or burst
    local stamp = tonumber(v[2]) or now
    if now > stamp then level = math.min(burst, level + (now - stamp) * rate) end
  end
  levels[i], rates[i], bursts[i] = level, rate, burst
  local need = ARGV[j + 5]
  if need ~= '' then
    local short = tonumber(need) - level
    if short > 0 then
      local w = 1e300  -- never by time alone: a request's end makes room
      if rate > 0 then w = short / rate end
      if w > wait then wait, refused = w, i end
    end
  end
end
local charge = wait <= 0
if charge and op ~= '' then
  charge = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', 86400) ~= false
end
local out = {wait > 0 and 0 or 1, tostring(wait), refused, lapsed}
for i = 1, n do
  local j = 3 + 5 * (i - 1)
  local amount = tonumber(ARGV[j + 4])
  if ARGV[j + 1] == 'c' then
    if charge and amount ~= 0 then
      local mine = redis.call('HINCRBY', KEYS[i], replica, amount)
      if mine <= 0 then redis.call('HDEL', KEYS[i], replica) end
      levels[i] = levels[i] - amount
    end
    redis.call('EXPIRE', KEYS[i], 86400)
  else
    if charge then levels[i] = math.min(bursts[i], levels[i] - amount) end
    redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'stamp', tostring(now))
    redis.call('EXPIRE', KEYS[i], math.ceil(2 * bursts[i] / rates[i]) + 60)
  end
  out[#out + 1] = tostring(levels[i])
end
return out
"""

# The heartbeat. KEYS: the leases, then this replica's concurrency hashes, then the id keys of
# its charges whose outcome it does not know. ARGV: replica, lease seconds, restate (0/1), then
# the requests it holds for each hash. A restate claims those ids first (so that a call that
# timed out here and runs later changes nothing) and writes the counts as they are, not added.
# Returns 1 when the lease had run out (the others may have dropped its counts).
BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mine = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600)
redis.call('EXPIRE', KEYS[1], 86400)
if ARGV[3] == '1' then
  local counts = #ARGV - 3
  for i = 2, #KEYS do
    if i <= counts + 1 then
      local held = tonumber(ARGV[2 + i])
      if held > 0 then
        redis.call('HSET', KEYS[i], ARGV[1], held)
        redis.call('EXPIRE', KEYS[i], 86400)
      else
        redis.call('HDEL', KEYS[i], ARGV[1])
      end
    else
      redis.call('SET', KEYS[i], '1', 'EX', 86400)
    end
  end
end
if mine == nil or mine < now then return 1 end
return 0
"""
