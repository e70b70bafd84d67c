-- register.lua: start a new epoch for a node and give it a fresh incarnation id.
-- KEYS[1]  nodes hash          (node id -> node record)
-- KEYS[2]  incarnations hash   (incarnation id -> node id)
-- KEYS[3]  incarnation counter (string, INCR)
-- KEYS[4]  the node's pending hash (buffered out-of-order batches; cleared)
-- KEYS[5]  retired hash        (incarnation id -> sweep pass it was forgotten in)
-- KEYS[6]  sweep state hash    (field 'pass': the sweep pass started last; see sweep.lua)
-- ARGV[1]  node id
-- ARGV[2]  previous epoch the node knows of (integer >= 0)
-- Returns  {epoch, incarnation}; epoch = max(stored epoch, ARGV[2]) + 1.
--          {0, 0}: every free id is retired, awaiting a sweep pass; nothing was changed
--          (the caller completes a sweep pass and calls again).
-- The old incarnation is forgotten, so its entries stop matching at once (fencing), and
-- retired: its id is not reissued until a sweep pass that started after this has removed
-- its records (otherwise a recycled id would adopt them).
local f = parse_node(redis.call('HGET', KEYS[1], ARGV[1]))
local incarnation = nil
for _ = 1, 65535 do
  local candidate = (redis.call('INCR', KEYS[3]) - 1) % 65535 + 1
  if redis.call('HEXISTS', KEYS[5], candidate) == 0
      and redis.call('HSETNX', KEYS[2], candidate, ARGV[1]) == 1 then
    incarnation = candidate
    break
  end
end
if not incarnation then
  if redis.call('HLEN', KEYS[5]) > 0 then return {0, 0} end
  return redis.error_reply('ERR no free incarnation id (65535 in use)')
end
local epoch = tonumber(ARGV[2])
if f then
  if f[2] > epoch then epoch = f[2] end
  if redis.call('HGET', KEYS[2], f[3]) == ARGV[1] then
    redis.call('HDEL', KEYS[2], f[3])
    redis.call('HSET', KEYS[5], f[3], tonumber(redis.call('HGET', KEYS[6], 'pass')) or 0)
  end
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], ARGV[1], format_node({1, epoch, incarnation, now_ms(), 0, 0, 0, 0}))
redis.call('DEL', KEYS[4])
return {epoch, incarnation}
