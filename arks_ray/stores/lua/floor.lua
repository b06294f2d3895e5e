-- floor.lua: raise a total counter to at least ARGV[1] (restore usage from ArksQuota status after a
-- data loss; never lowers it). ARGV[2] is the TTL in ms (0: none). Returns 1 if raised.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if current >= floor then return 0 end
redis.call('SET', KEYS[1], floor)
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
