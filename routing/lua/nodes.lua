-- nodes.lua: the node table and the server clock, read in one atomic step (read-only).
-- KEYS[1]  nodes hash
-- Returns  {now_ms, node id 1, record 1, node id 2, record 2, ...}
local out = {now_ms()}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
