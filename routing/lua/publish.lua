-- publish.lua: apply one node's event batch atomically, exactly once, in sequence order.
-- KEYS[1]   nodes hash (node id -> node record)
-- KEYS[2]   incarnations hash (the incarnations still registered)
-- KEYS[3]   the node's pending hash (seq -> ops blob of a batch that arrived ahead of a gap)
-- KEYS[4..] the family hashes this batch names (the blob names them too, by position)
-- ARGV[1]   node id
-- ARGV[2]   epoch
-- ARGV[3]   sequence number (1, 2, 3, ... per epoch)
-- ARGV[4]   entry TTL in ms (each family written to expires this long after)
-- ARGV[5]   how far ahead of the last applied batch a batch may be buffered
-- ARGV[6]   ops blob (fixed fields, big-endian):
--             u8 version=1 | u16 F | F x (u16 length | family key name)
--             | u32 N | N x (u8 kind 1 stored/2 removed/3 moved | u8 tier | u16 family index
--                            | 16-byte block key)
-- Returns   {status, applied_through, batches_applied, current_epoch, garbage keys replaced}
--             status 1 applied, 2 duplicate, 3 buffered, 4 out of window,
--                    5 unknown node (register again), 6 fenced (epoch is not current)
-- A buffered blob is applied by the later call that fills the gap before it; the family keys
-- it names are read from the blob (one Redis; see routing/README.md for Redis Cluster).
-- Every entry it rewrites also loses the records of incarnations no longer registered (a
-- restarted node's re-announcement thus cleans up after its old epoch).

-- Parse and check a whole blob before anything is written (scripts do not roll back).
local function parse_ops(blob)
  if #blob < 7 or byte(blob, 1) ~= 1 then return nil end
  local nf = u16(blob, 2)
  local pos = 4
  local keys = {}
  for i = 1, nf do
    if pos + 1 > #blob then return nil end
    local len = u16(blob, pos)
    keys[i] = sub(blob, pos + 2, pos + 1 + len)
    pos = pos + 2 + len
  end
  if pos + 3 > #blob then return nil end
  local n = ((byte(blob, pos) * 256 + byte(blob, pos + 1)) * 256 + byte(blob, pos + 2)) * 256
    + byte(blob, pos + 3)
  pos = pos + 4
  if #blob ~= pos - 1 + n * 20 then return nil end
  for i = 0, n - 1 do
    local o = pos + i * 20
    local kind, tier, fam = byte(blob, o), byte(blob, o + 1), u16(blob, o + 2)
    if kind < 1 or kind > 3 or tier > 2 or fam >= nf then return nil end
  end
  return {keys = keys, base = pos, n = n}
end

-- The entry v without the record of incarnation (hi, lo) and without the records of
-- incarnations not in `known`; '' when v is absent.
local function strip(v, hi, lo, known)
  if not v then return '' end
  local keep = {}
  for o = 1, #v - 2, 3 do
    local a, b = byte(v, o, o + 1)
    if not (a == hi and b == lo) and known[a * 256 + b] then keep[#keep + 1] = sub(v, o, o + 2) end
  end
  return table.concat(keep)
end

-- Apply parsed ops; returns how many garbage keys (not hashes) it had to replace.
local function apply(ops, blob, incarnation, ttl, known)
  local hi, lo = floor(incarnation / 256), incarnation % 256
  local touched = {}
  local garbage = 0
  for _, key in ipairs(ops.keys) do
    local t = key_type(key)
    if t ~= 'hash' and t ~= 'none' then
      redis.call('DEL', key)
      garbage = garbage + 1
    end
  end
  for i = 0, ops.n - 1 do
    local o = ops.base + i * 20
    local kind, tier = byte(blob, o), byte(blob, o + 1)
    local key = ops.keys[u16(blob, o + 2) + 1]
    local field = sub(blob, o + 4, o + 19)
    local v = redis.call('HGET', key, field)
    if v and #v % 3 ~= 0 then v = false end -- a malformed entry is replaced, not parsed
    if kind == 1 then
      redis.call('HSET', key, field, strip(v, hi, lo, known) .. char(hi, lo, tier))
    elseif v then
      local rest = strip(v, hi, lo, known)
      -- did v hold this incarnation's record? (rest may also have lost dead records)
      local held = false
      for o = 1, #v - 2, 3 do
        local a, b = byte(v, o, o + 1)
        if a == hi and b == lo then held = true break end
      end
      if kind == 3 and held then
        redis.call('HSET', key, field, rest .. char(hi, lo, tier))
      elseif rest == '' then
        redis.call('HDEL', key, field)
      elseif rest ~= v then
        redis.call('HSET', key, field, rest)
      end
    end
    touched[key] = true
  end
  for key in pairs(touched) do
    -- a family with no block left is deleted; otherwise it carries the marker and a TTL
    if redis.call('HLEN', key) <= 1 and redis.call('HEXISTS', key, MARKER_FIELD) == 1 then
      redis.call('DEL', key)
    elseif redis.call('EXISTS', key) == 1 then
      redis.call('HSETNX', key, MARKER_FIELD, MARKER_VALUE)
      redis.call('PEXPIRE', key, ttl)
    end
  end
  return garbage
end

local f = parse_node(redis.call('HGET', KEYS[1], ARGV[1]))
local PENDING = KEYS[3]
if not f then return {5, 0, 0, 0, 0} end
local epoch, seq = tonumber(ARGV[2]), tonumber(ARGV[3])
if f[2] ~= epoch then return {6, f[5], 0, f[2], 0} end
local ttl, window, blob = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local through = f[5]
if seq <= through or redis.call('HEXISTS', PENDING, seq) == 1 then
  return {2, through, 0, epoch, 0}
end
local ops = parse_ops(blob)
if not ops then return redis.error_reply('ERR malformed ops blob') end
if seq > through + 1 then
  if seq > through + 1 + window then return {4, through, 0, epoch, 0} end
  redis.call('HSET', PENDING, seq, blob)
  redis.call('PEXPIRE', PENDING, ttl)
  return {3, through, 0, epoch, 0}
end
local known = {}
local incs = redis.call('HKEYS', KEYS[2])
for i = 1, #incs do known[tonumber(incs[i])] = true end
local garbage = apply(ops, blob, f[3], ttl, known)
through = seq
local applied = 1
while true do
  local nxt = redis.call('HGET', PENDING, through + 1)
  if not nxt then break end
  redis.call('HDEL', PENDING, through + 1)
  local buffered = parse_ops(nxt)
  if buffered then garbage = garbage + apply(buffered, nxt, f[3], ttl, known) end
  through = through + 1
  applied = applied + 1
end
f[5] = through
redis.call('HSET', KEYS[1], ARGV[1], format_node(f))
return {1, through, applied, epoch, garbage}
