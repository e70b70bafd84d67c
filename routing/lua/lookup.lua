-- lookup.lua: for every live incarnation, how many LEADING probes of a chain it holds, by tier.
-- KEYS[1]  the family hash of the chain (block key -> holder records)
-- ARGV[1]  probe keys, 16 bytes each, in chain order
-- ARGV[2]  live incarnations, 2 bytes each (big-endian); records of others are ignored
-- Returns  {malformed, inc 1, leading probes 1, gpu 1, cpu 1, nvme 1, inc 2, ...}
--          malformed: entries that did not decode (skipped; the walk stops there)
-- Reads in growing chunks (HMGET of 64, 128, ... 1024 fields) and stops at the first probe
-- that no still-matching incarnation holds, so a short match costs one small HMGET.
local probes, livebuf = ARGV[1], ARGV[2]
local n = floor(#probes / 16)
local lead = {} -- live incarnation -> leading probes it holds so far
for o = 1, #livebuf - 1, 2 do lead[byte(livebuf, o) * 256 + byte(livebuf, o + 1)] = 0 end
local tiers = {} -- incarnation * 4 + tier -> probes held on that tier
local malformed = 0
local depth = 0
local chunk = 64
local done = false
while not done and depth < n do
  local last = math.min(n, depth + chunk)
  local fields = {}
  local k = 0
  for i = depth, last - 1 do
    k = k + 1
    fields[k] = sub(probes, i * 16 + 1, i * 16 + 16)
  end
  local vals = redis.pcall('HMGET', KEYS[1], unpack(fields))
  if vals.err then
    malformed = malformed + 1 -- not a hash: garbage under our key
    break
  end
  for j = 1, k do
    local v = vals[j]
    if not v then done = true break end
    local len = #v
    if len % 3 ~= 0 then malformed = malformed + 1 done = true break end
    local extended = false
    for o = 1, len, 3 do
      local hi, lo, tier = byte(v, o, o + 2)
      local inc = hi * 256 + lo
      if lead[inc] == depth then
        if tier <= 2 then
          lead[inc] = depth + 1
          local t = inc * 4 + tier
          tiers[t] = (tiers[t] or 0) + 1
          extended = true
        else
          malformed = malformed + 1
        end
      end
    end
    if not extended then done = true break end
    depth = depth + 1
  end
  if chunk < 1024 then chunk = chunk * 2 end
end
local out = {malformed}
for inc, count in pairs(lead) do
  if count > 0 then
    out[#out + 1] = inc
    out[#out + 1] = count
    out[#out + 1] = tiers[inc * 4] or 0
    out[#out + 1] = tiers[inc * 4 + 1] or 0
    out[#out + 1] = tiers[inc * 4 + 2] or 0
  end
end
return out
