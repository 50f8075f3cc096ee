-- settle.lua: one node reports its spend and takes its leases, for every scope in one call.
--
-- KEYS[1]              the store's epoch (a random id; a new one means the store lost its data)
-- KEYS[2+4i .. 5+4i]   scope i: fleet totals per minute, this node's amounts per minute,
--                      leases per node, lease expiry (unix ms) per node
-- ARGV: node, the epoch the node knows ('' at first), an epoch to set when none exists,
--       the node's current minute, lease time to live (ms), then per scope:
--       window (minutes), limit, lease wanted, n, and n pairs (minute, this node's amount).
--
-- A node sends absolute amounts (what it spent in that minute), never increments: the
-- script adds only the growth over what the node reported before, so a report sent twice,
-- or again after a restart or a lost answer, never counts twice.
--
-- Returns {'epoch', current} when the node's epoch is stale (it must resend everything),
-- else {'ok', epoch, total_1, grant_1, total_2, grant_2, ...} as strings.

local epoch = redis.call('GET', KEYS[1])
if not epoch then
  -- A store without an epoch is new or lost its data: whoever finds it so sets a fresh
  -- one (each call proposes a new random id) and must report everything it has.
  redis.call('SET', KEYS[1], ARGV[3])
  return {'epoch', ARGV[3]}
end
if ARGV[2] ~= epoch then
  return {'epoch', epoch}
end

local node = ARGV[1]
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {'ok', epoch}
local a = 6
local k = 2
while a <= #ARGV do
  local window = tonumber(ARGV[a])
  local limit = tonumber(ARGV[a + 1])
  local want = tonumber(ARGV[a + 2])
  local n = tonumber(ARGV[a + 3])
  a = a + 4
  local totals, mine, leases, expiry = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 4
  local oldest = now - window + 1
  for _ = 1, n do
    local minute, amount = ARGV[a], tonumber(ARGV[a + 1])
    a = a + 2
    if tonumber(minute) >= oldest then
      -- A minute's amount only grows: a node restarted from a state that missed its last
      -- flush reports less than it did before, and what it reported was spent.
      local before = tonumber(redis.call('HGET', mine, minute) or '0')
      if amount > before then
        redis.call('HSET', mine, minute, ARGV[a - 1])
        redis.call('HINCRBYFLOAT', totals, minute, amount - before)
      end
    end
  end
  -- The window's total. Minutes that left it are dropped one minute late, so a node whose
  -- clock runs ahead does not delete a minute a slower node still reports into.
  local total = 0
  local all = redis.call('HGETALL', totals)
  for i = 1, #all, 2 do
    local m = tonumber(all[i])
    if m < oldest - 1 then
      redis.call('HDEL', totals, all[i])
    elseif m >= oldest then
      total = total + tonumber(all[i + 1])
    end
  end
  local own = redis.call('HKEYS', mine)
  for i = 1, #own do
    if tonumber(own[i]) < oldest - 1 then
      redis.call('HDEL', mine, own[i])
    end
  end
  -- Other nodes' unexpired leases are reserved; this node's old lease is replaced.
  local reserved = 0
  local exp = redis.call('HGETALL', expiry)
  for i = 1, #exp, 2 do
    if tonumber(exp[i + 1]) < now_ms then
      redis.call('HDEL', expiry, exp[i])
      redis.call('HDEL', leases, exp[i])
    elseif exp[i] ~= node then
      reserved = reserved + tonumber(redis.call('HGET', leases, exp[i]) or '0')
    end
  end
  local grant = math.min(want, limit - total - reserved)
  if grant > 0 then
    redis.call('HSET', leases, node, tostring(grant))
    redis.call('HSET', expiry, node, tostring(now_ms + ttl))
  else
    grant = 0
    redis.call('HDEL', leases, node)
    redis.call('HDEL', expiry, node)
  end
  -- Idle scopes expire a minute after their window.
  local keep = (window + 1) * 60000
  for _, key in ipairs({totals, mine, leases, expiry}) do
    redis.call('PEXPIRE', key, keep)
  end
  table.insert(out, tostring(total))
  table.insert(out, tostring(grant))
end
return out
