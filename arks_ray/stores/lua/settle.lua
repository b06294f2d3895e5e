-- settle.lua: replace each reserved amount with the final one; release concurrency leases.
-- A window bucket that has already left its window, or a total counter deleted by a reset, is left alone.
--
-- Idempotent: the last key marks the request settled (for ARGV[3] ms), and a settlement retried after a
-- timeout whose first attempt did land changes nothing more.
--
-- KEYS[i]   counter i; KEYS[#KEYS] the request's settled marker
-- ARGV[1]   request id
-- ARGV[2]   when the reservation was made, ms since the epoch
-- ARGV[3]   how long the marker is kept, ms
-- ARGV[4..] four per counter: kind (1 window, 2 lease, 3 total), bucket_ms, reserved amount, final amount

local rid = ARGV[1]
local reserved_at = tonumber(ARGV[2])
if not redis.call('SET', KEYS[#KEYS], 1, 'NX', 'PX', tonumber(ARGV[3])) then
  return 0
end
for i = 1, #KEYS - 1 do
  local base = 3 + (i - 1) * 4
  local kind, bucket_ms = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local delta = tonumber(ARGV[base + 4]) - tonumber(ARGV[base + 3])
  if kind == 1 then
    local idx = math.floor(reserved_at / bucket_ms)
    if delta ~= 0 and redis.call('HEXISTS', KEYS[i], idx) == 1 then
      if redis.call('HINCRBY', KEYS[i], idx, delta) < 0 then redis.call('HSET', KEYS[i], idx, 0) end
    end
  elseif kind == 2 then
    redis.call('ZREM', KEYS[i], rid)
  elseif delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], delta) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 1
