-- lookup.lua: for every live incarnation, how many LEADING probes of a chain it holds, by tier.
-- KEYS[1]  the family hash of the chain (block key -> holder records)
-- ARGV[1]  probe keys, 16 bytes each, in chain order
-- ARGV[2]  live incarnations, 2 bytes each (big-endian); records of others are ignored
-- Returns  {malformed, inc 1, leading probes 1, gpu 1, cpu 1, nvme 1, inc 2, ...}
--          malformed: entries that did not decode (skipped; the walk stops there)
-- Reads in growing chunks (HMGET of 32, 64, ... 512 fields) and stops at the first probe
-- that no still-matching incarnation holds, so a short match costs one small HMGET.
local probes, livebuf = ARGV[1], ARGV[2]
local n = floor(#probes / 16)
local live = {}
for o = 1, #livebuf - 1, 2 do live[u16(livebuf, o)] = true end
local lead, gpu, cpu, nvme = {}, {}, {}, {}
local malformed = 0
local depth = 0
local chunk = 32
local done = false
while not done and depth < n do
  local last = math.min(n, depth + chunk)
  local fields = {}
  for i = depth, last - 1 do fields[#fields + 1] = sub(probes, i * 16 + 1, i * 16 + 16) end
  local vals = redis.pcall('HMGET', KEYS[1], unpack(fields))
  if vals.err then
    malformed = malformed + 1 -- not a hash: garbage under our key
    break
  end
  for j = 1, #fields do
    local v = vals[j]
    if not v then done = true break end
    if #v % 3 ~= 0 then malformed = malformed + 1 done = true break end
    local extended = false
    for o = 1, #v, 3 do
      local inc = u16(v, o)
      if live[inc] and (lead[inc] or 0) == depth then
        local tier = byte(v, o + 2)
        if tier == 0 then gpu[inc] = (gpu[inc] or 0) + 1
        elseif tier == 1 then cpu[inc] = (cpu[inc] or 0) + 1
        elseif tier == 2 then nvme[inc] = (nvme[inc] or 0) + 1
        else tier = nil malformed = malformed + 1 end
        if tier then
          lead[inc] = depth + 1
          extended = true
        end
      end
    end
    if not extended then done = true break end
    depth = depth + 1
  end
  if chunk < 512 then chunk = chunk * 2 end
end
local out = {malformed}
for inc, count in pairs(lead) do
  out[#out + 1] = inc
  out[#out + 1] = count
  out[#out + 1] = gpu[inc] or 0
  out[#out + 1] = cpu[inc] or 0
  out[#out + 1] = nvme[inc] or 0
end
return out
