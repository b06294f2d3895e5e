-- renew.lua: push the expiry of concurrency leases still held; a released lease (settled) stays released.
--
-- KEYS[i]   lease counter i (a sorted set of request ids scored by expiry)
-- ARGV[1]   the new expiry, ms since the epoch
-- ARGV[1+i] the request id holding lease i
-- Returns   how many leases were renewed

local until_ms = tonumber(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  if redis.call('ZSCORE', KEYS[i], ARGV[1 + i]) then
    redis.call('ZADD', KEYS[i], 'XX', until_ms, ARGV[1 + i])
    redis.call('PEXPIREAT', KEYS[i], until_ms, 'GT')
    renewed = renewed + 1
  end
end
return renewed
