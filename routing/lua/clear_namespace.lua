-- clear_namespace.lua: one bounded step of deleting a namespace's family hashes.
-- ARGV[1]  SCAN cursor   ARGV[2] key pattern of the namespace's family hashes   ARGV[3] SCAN COUNT
-- Returns  {next cursor, keys deleted}. The caller repeats until the cursor is "0".
-- Keys are found by SCAN (one Redis; see routing/README.md for Redis Cluster).
local scan = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', tonumber(ARGV[3]))
local deleted = 0
for _, key in ipairs(scan[2]) do
  deleted = deleted + redis.call('UNLINK', key)
end
return {scan[1], deleted}
