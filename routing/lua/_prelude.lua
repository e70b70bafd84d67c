-- _prelude.lua: helpers shared by every registry script. routing/redis_registry.py prepends
-- this file to each script before loading it, so each script stays one EVALSHA.
--
-- Node record (a field of the nodes hash, fixed fields, space-separated integers):
--   "1 <epoch> <incarnation> <last_beat_ms> <applied_through> <inflight> <free_blocks> <total_blocks>"
-- Block entry (a field of a family hash, key = 16-byte block key): 3 bytes per holder,
--   u16 incarnation (big-endian) | u8 tier (0 gpu, 1 cpu, 2 nvme)
-- Marker field (MARKER_FIELD -> MARKER_VALUE, 65 bytes): written into every family hash.
--   A value over 64 bytes (hash-max-listpack-value) keeps the hash in hashtable encoding,
--   so each lookup probe is O(1) instead of a scan of a listpack of up to 128 fields.
local byte, char, sub, floor = string.byte, string.char, string.sub, math.floor

local MARKER_FIELD = 'kvc:family'
local MARKER_VALUE = 'kvcluster prefix family v1; fields: 16-byte block key -> 3-byte holder records'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

local function parse_node(rec)
  if not rec then return nil end
  local f = {}
  for x in string.gmatch(rec, '%S+') do f[#f + 1] = tonumber(x) end
  if #f ~= 8 or f[1] ~= 1 then return nil end
  for i = 2, 8 do
    if not f[i] or f[i] < 0 or f[i] ~= floor(f[i]) then return nil end
  end
  return f
end

local function format_node(f)
  return string.format('1 %.0f %.0f %.0f %.0f %.0f %.0f %.0f',
    f[2], f[3], f[4], f[5], f[6], f[7], f[8])
end

local function u16(s, o)
  return byte(s, o) * 256 + byte(s, o + 1)
end

-- The type name of a key (TYPE replies with a status table).
local function key_type(key)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then return t.ok end
  return t
end
