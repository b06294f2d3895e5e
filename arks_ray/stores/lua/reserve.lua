-- reserve.lua: check every counter, and only if all admit, add every amount (all or nothing).
-- Mirrors arks_ray.gateway.limits (window_used / window_retry_after_ms / window_reset_ms) and
-- arks_ray.stores.memory.MemoryStore; the shared contract suite holds the two to the same behaviour.
--
-- KEYS[i]   counter i
-- ARGV[1]   now, ms since the epoch (the caller's clock, so windows are testable)
-- ARGV[2]   request id (the lease member of concurrency counters)
-- ARGV[3..] six per counter: kind (1 window, 2 lease, 3 total), limit, amount, bucket_ms, span, ttl_ms
-- Returns   {admitted 0/1, denied index (1-based, 0 if admitted), retry_after_ms, remaining..., reset...}

local now = tonumber(ARGV[1])
local rid = ARGV[2]
local n = #KEYS

local function arg(i, j)
  return tonumber(ARGV[2 + (i - 1) * 6 + j])
end

local function load_buckets(key)
  local flat = redis.call('HGETALL', key)
  local buckets = {}
  for j = 1, #flat, 2 do
    buckets[#buckets + 1] = {tonumber(flat[j]), tonumber(flat[j + 1])}
  end
  return buckets
end

local function counted(buckets, lo, hi)
  local sum = 0
  for _, b in ipairs(buckets) do
    if b[1] >= lo and b[1] <= hi then sum = sum + b[2] end
  end
  return sum
end

local function reset_ms(buckets, cur, span, bucket_ms)
  local newest = nil
  for _, b in ipairs(buckets) do
    if b[1] >= cur - span and b[1] <= cur and b[2] > 0 and (newest == nil or b[1] > newest) then newest = b[1] end
  end
  if newest == nil then return 0 end
  return (newest + span + 1) * bucket_ms - now
end

local state = {}
local refused, retry = 0, 0
for i = 1, n do
  local kind, limit, amount = arg(i, 1), arg(i, 2), arg(i, 3)
  local bucket_ms, span = arg(i, 4), arg(i, 5)
  if kind == 1 then
    local cur = math.floor(now / bucket_ms)
    local buckets = load_buckets(KEYS[i])
    local used = counted(buckets, cur - span, cur)
    state[i] = {cur = cur, buckets = buckets, used = used}
    if refused == 0 and used + amount > limit then
      refused = i
      if amount > limit then
        retry = -1
      else
        retry = (cur + span + 1) * bucket_ms - now
        for k = 1, span + 1 do
          if counted(buckets, cur + k - span, cur) + amount <= limit then
            retry = (cur + k) * bucket_ms - now
            break
          end
        end
      end
    end
  elseif kind == 2 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local used = redis.call('ZCARD', KEYS[i])
    state[i] = {used = used}
    if refused == 0 and used + 1 > limit then
      refused = i
      if limit > 0 then retry = 1000 else retry = -1 end
    end
  else
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    state[i] = {used = used}
    if refused == 0 and used + amount > limit then refused, retry = i, -1 end
  end
end

local out = {0, refused, retry}
if refused == 0 then
  out[1] = 1
  for i = 1, n do
    local kind, amount, bucket_ms, span, ttl = arg(i, 1), arg(i, 3), arg(i, 4), arg(i, 5), arg(i, 6)
    local s = state[i]
    if kind == 1 then
      redis.call('HINCRBY', KEYS[i], s.cur, amount)
      for _, b in ipairs(s.buckets) do
        if b[1] < s.cur - span then redis.call('HDEL', KEYS[i], b[1]) end
      end
      redis.call('PEXPIRE', KEYS[i], ttl)
      local found = false
      for _, b in ipairs(s.buckets) do
        if b[1] == s.cur then b[2] = b[2] + amount; found = true end
      end
      if not found then s.buckets[#s.buckets + 1] = {s.cur, amount} end
      s.used = s.used + amount
    elseif kind == 2 then
      redis.call('ZADD', KEYS[i], now + ttl, rid)
      redis.call('PEXPIRE', KEYS[i], ttl)
      s.used = s.used + 1
    else
      local v = redis.call('INCRBY', KEYS[i], amount)
      if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
      s.used = v
    end
  end
end
for i = 1, n do
  local remaining = arg(i, 2) - state[i].used
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
end
for i = 1, n do
  if arg(i, 1) == 1 then
    out[#out + 1] = reset_ms(state[i].buckets, state[i].cur, arg(i, 5), arg(i, 4))
  else
    out[#out + 1] = 0
  end
end
return out
