-- sweep.lua: one bounded step of garbage collection over the family hashes.
-- KEYS[1]  incarnations hash (the incarnations still registered)
-- ARGV[1]  SCAN cursor   ARGV[2] key pattern of the family hashes   ARGV[3] SCAN COUNT
-- Returns  {next cursor, records removed, malformed entries removed, non-hash keys skipped}
-- Drops the records of incarnations no longer registered (purged or re-registered nodes)
-- and entries that do not decode. Keys are found by SCAN (one Redis; see routing/README.md).
local known = {}
local incs = redis.call('HKEYS', KEYS[1])
for i = 1, #incs do known[tonumber(incs[i])] = true end
local scan = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', tonumber(ARGV[3]))
local removed, malformed, skipped = 0, 0, 0
for _, key in ipairs(scan[2]) do
  if key_type(key) ~= 'hash' then
    skipped = skipped + 1
  else
    local all = redis.call('HGETALL', key)
    for i = 1, #all, 2 do
      local field, v = all[i], all[i + 1]
      if field == MARKER_FIELD then
        -- the encoding marker, not an entry
      elseif #v % 3 ~= 0 or #field ~= 16 then
        redis.call('HDEL', key, field)
        malformed = malformed + 1
      else
        local keep = {}
        for o = 1, #v, 3 do
          if known[u16(v, o)] then keep[#keep + 1] = sub(v, o, o + 2) else removed = removed + 1 end
        end
        if #keep == 0 then
          redis.call('HDEL', key, field)
        elseif #keep * 3 ~= #v then
          redis.call('HSET', key, field, table.concat(keep))
        end
      end
    end
    if redis.call('HLEN', key) <= 1 and redis.call('HEXISTS', key, MARKER_FIELD) == 1 then
      redis.call('DEL', key)
    end
  end
end
return {scan[1], removed, malformed, skipped}
