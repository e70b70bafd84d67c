-- purge.lua: forget a node: its record, its incarnation and its buffered batches.
-- KEYS[1]  nodes hash   KEYS[2] incarnations hash   KEYS[3] the node's pending hash
-- KEYS[4]  retired hash (incarnation id -> sweep pass it was forgotten in)
-- KEYS[5]  sweep state hash (field 'pass': the sweep pass started last; see sweep.lua)
-- ARGV[1]  node id
-- Returns  1 if the node was known, else 0. Its block entries no longer match (their
-- incarnation is gone) and are reclaimed by sweep.lua; the id stays retired (not reissued)
-- until a sweep pass that started after this is complete.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
if not rec then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local f = parse_node(rec)
if f and redis.call('HGET', KEYS[2], f[3]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], f[3])
  redis.call('HSET', KEYS[4], f[3], tonumber(redis.call('HGET', KEYS[5], 'pass')) or 0)
end
return 1
