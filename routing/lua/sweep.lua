-- sweep.lua: one bounded step of the incremental garbage collection over the family hashes.
-- KEYS[1]  incarnations hash (the incarnations still registered)
-- KEYS[2]  retired hash (incarnation -> pass number when it was forgotten; not reissued yet)
-- KEYS[3]  sweep state hash: pass (last pass started), done (last pass completed),
--          cursor (SCAN cursor of the pass in progress, 'end' once SCAN is through; absent
--          when no pass is in progress), family and fcursor (the family being read, HSCAN cursor)
-- KEYS[4]  sweep queue (list of family keys SCAN returned that the pass has not read yet)
-- ARGV[1]  key pattern of the family hashes
-- ARGV[2]  budget: about how many hash fields (and SCAN slots) this step may visit
-- ARGV[3]  '1' to abandon the pass in progress and start a new one, else '0'
-- ARGV[4]  SCAN COUNT
-- Returns  {records removed, malformed entries removed, non-hash keys skipped, pass, done}
-- Drops the records of incarnations no longer registered (purged or re-registered nodes),
-- entries that do not decode, and families left with nothing but the marker. Steps of all
-- callers share one pass (state in KEYS[3..4]); a pass ends once SCAN and the queue are
-- through, and then releases the retired ids forgotten before it started: a family that
-- existed all through the pass was read whole (SCAN and HSCAN guarantee it), and nothing
-- writes the records of a forgotten id again, so none of its records are left anywhere.
-- Keys are found by SCAN (one Redis; see routing/README.md for Redis Cluster).
local known = {}
local incs = redis.call('HKEYS', KEYS[1])
for i = 1, #incs do known[tonumber(incs[i])] = true end
local STATE, QUEUE = KEYS[3], KEYS[4]
local s = redis.call('HMGET', STATE, 'pass', 'done', 'cursor', 'family', 'fcursor')
local pass, done = tonumber(s[1]) or 0, tonumber(s[2]) or 0
local cursor, family, fcursor = s[3], s[4], s[5]
if ARGV[3] == '1' then cursor = false end
if not cursor then
  pass = pass + 1
  cursor, family = '0', false
  redis.call('DEL', QUEUE)
end
local budget = tonumber(ARGV[2])
local scan_count = tonumber(ARGV[4])
local removed, malformed, skipped = 0, 0, 0

-- Clean the fields of one HSCAN page of `key`; returns how many fields it visited.
local function clean(key, page)
  for i = 1, #page, 2 do
    local field, v = page[i], page[i + 1]
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
  return #page / 2
end

while budget > 0 do
  if family and key_type(family) ~= 'hash' then
    -- replaced by garbage since the last step (or gone): skip it
    if key_type(family) ~= 'none' then skipped = skipped + 1 end
    family = false
  elseif family then
    local page = redis.call('HSCAN', family, fcursor, 'COUNT', math.min(budget, 256))
    fcursor = page[1]
    budget = budget - 1 - clean(family, page[2])
    if fcursor == '0' then
      if redis.call('HLEN', family) <= 1 and redis.call('HEXISTS', family, MARKER_FIELD) == 1 then
        redis.call('DEL', family)
      end
      family = false
    end
  elseif redis.call('LLEN', QUEUE) > 0 then
    local key = redis.call('LPOP', QUEUE)
    local t = key_type(key)
    if t == 'hash' then
      family, fcursor = key, '0'
    elseif t ~= 'none' then
      skipped = skipped + 1
    end
    budget = budget - 1
  elseif cursor ~= 'end' then
    local scan = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', scan_count)
    cursor = scan[1]
    if cursor == '0' then cursor = 'end' end
    if #scan[2] > 0 then redis.call('RPUSH', QUEUE, unpack(scan[2])) end
    budget = budget - scan_count
  else
    -- the pass is complete: release the ids forgotten before it started
    done, cursor = pass, false
    local retired = redis.call('HGETALL', KEYS[2])
    for i = 1, #retired, 2 do
      if tonumber(retired[i + 1]) ~= pass then redis.call('HDEL', KEYS[2], retired[i]) end
    end
    break
  end
end

redis.call('HSET', STATE, 'pass', pass, 'done', done)
if cursor then redis.call('HSET', STATE, 'cursor', cursor) else redis.call('HDEL', STATE, 'cursor') end
if family then
  redis.call('HSET', STATE, 'family', family, 'fcursor', fcursor)
else
  redis.call('HDEL', STATE, 'family', 'fcursor')
end
return {removed, malformed, skipped, pass, done}
