-- stats.lua: one bounded step of counting the block index (read-only).
-- ARGV[1]  SCAN cursor   ARGV[2] key pattern of the family hashes   ARGV[3] SCAN COUNT
-- Returns  {next cursor, families, blocks, records, bytes, malformed, memory_usage_supported}
--          bytes: sum of MEMORY USAGE of the family hashes (0 and flag 0 where unsupported)
local scan = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', tonumber(ARGV[3]))
local families, blocks, records, bytes, malformed, supported = 0, 0, 0, 0, 0, 1
for _, key in ipairs(scan[2]) do
  if key_type(key) ~= 'hash' then
    malformed = malformed + 1
  else
    families = families + 1
    local all = redis.call('HGETALL', key)
    for i = 2, #all, 2 do
      local v = all[i]
      if all[i - 1] == MARKER_FIELD then
        -- the encoding marker, not an entry
      elseif #v % 3 ~= 0 or #all[i - 1] ~= 16 then malformed = malformed + 1 else
        blocks = blocks + 1
        records = records + #v / 3
      end
    end
    local usage = redis.pcall('MEMORY', 'USAGE', key, 'SAMPLES', 0)
    if type(usage) == 'number' then bytes = bytes + usage else supported = 0 end
  end
end
return {scan[1], families, blocks, records, bytes, malformed, supported}
