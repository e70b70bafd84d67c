-- heartbeat.lua: renew a node's liveness and record its load.
-- KEYS[1]  nodes hash
-- ARGV[1]  node id
-- ARGV[2]  epoch
-- ARGV[3]  in-flight requests   ARGV[4] free blocks   ARGV[5] total blocks
-- Returns  {1} renewed | {0} unknown node (register again) | {-1, current epoch} fenced
local f = parse_node(redis.call('HGET', KEYS[1], ARGV[1]))
if not f then return {0} end
if f[2] ~= tonumber(ARGV[2]) then return {-1, f[2]} end
f[4] = now_ms()
f[6] = tonumber(ARGV[3])
f[7] = tonumber(ARGV[4])
f[8] = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], format_node(f))
return {1}
