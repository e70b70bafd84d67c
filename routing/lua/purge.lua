-- purge.lua: forget a node: its record, its incarnation and its buffered batches.
-- KEYS[1]  nodes hash   KEYS[2] incarnations hash   KEYS[3] the node's pending hash
-- ARGV[1]  node id
-- Returns  1 if the node was known, else 0. Its block entries no longer match (their
-- incarnation is gone) and are reclaimed by sweep.lua.
local rec = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
if not rec then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
local f = parse_node(rec)
if f and redis.call('HGET', KEYS[2], f[3]) == ARGV[1] then
  redis.call('HDEL', KEYS[2], f[3])
end
return 1
