-- A Kong-shaped gateway for bench/run.sh: key-auth (keys in a shared dict loaded at init, as
-- Kong's cache holds them) and rate-limiting with Kong's two policies, on the same two windows
-- msgflash-gateway enforces: 10 requests a second per key and the account's month.
--   local: counters in a lua_shared_dict (Kong's "local" policy)
--   redis: one pipeline of INCR + EXPIRE per window per request over a kept-alive socket
--          (Kong's "redis" policy), with a minimal RESP writer/reader (Debian has no
--          lua-resty-redis)
local M = {}

local PER_SECOND = 10
local PER_MONTH = 5000000

local function refuse(status, code, message)
  ngx.status = status
  ngx.header["content-type"] = "application/json"
  if status == 429 then ngx.header["retry-after"] = "1" end
  ngx.say('{"error":{"code":"' .. code .. '","message":"' .. message .. '"}}')
  return ngx.exit(status)
end

function M.load(path)
  local keys = ngx.shared.keys
  local n = 0
  for line in io.lines(path) do
    if #line > 0 then
      keys:set(line, string.format("bench%05d", math.floor(n / 10)))
      n = n + 1
    end
  end
end

local function bulk(s)
  return "$" .. #s .. "\r\n" .. s .. "\r\n"
end

-- INCR + EXPIRE for each window, one round trip; returns the counts.
local function redis_incr(windows)
  local sock = ngx.socket.tcp()
  sock:settimeout(200)
  local ok, err = sock:connect("127.0.0.1", tonumber(os.getenv("KONG_REDIS_PORT")))
  if not ok then return nil, err end
  local out = {}
  for _, w in ipairs(windows) do
    out[#out + 1] = "*2\r\n" .. bulk("INCR") .. bulk(w[1])
    out[#out + 1] = "*3\r\n" .. bulk("EXPIRE") .. bulk(w[1]) .. bulk(tostring(w[2]))
  end
  local _, err = sock:send(table.concat(out))
  if err then return nil, err end
  local counts = {}
  for i = 1, #windows * 2 do
    local line, err = sock:receive("*l")
    if not line then return nil, err end
    if i % 2 == 1 then counts[#counts + 1] = tonumber(line:sub(2)) end
  end
  sock:setkeepalive(60000, 256)
  return counts
end

function M.access(policy)
  local key = ngx.var.http_x_api_key
  if not key or key == "" then
    return refuse(401, "UNAUTHORIZED", "Missing API key. Send it in the x-api-key header.")
  end
  local account = ngx.shared.keys:get(key)
  if not account then
    return refuse(401, "UNAUTHORIZED", "Invalid or revoked API key")
  end
  local now = ngx.time()
  local second = "rl:" .. key .. ":" .. now
  local month = "q:" .. account .. ":" .. os.date("!%Y-%m", now)
  local per_second, per_month
  if policy == "redis" then
    local counts, err = redis_incr({ { second, 1 }, { month, 2678400 } })
    if not counts then
      ngx.log(ngx.ERR, "rate limiting: ", err)
      return refuse(503, "SERVICE_UNAVAILABLE", "The key store is unavailable. Try again shortly.")
    end
    per_second, per_month = counts[1], counts[2]
  else
    local counters = ngx.shared.counters
    per_second = counters:incr(second, 1, 0, 1)
    per_month = counters:incr(month, 1, 0, 2678400)
  end
  if per_second > PER_SECOND then
    return refuse(429, "API_RATE_LIMIT_EXCEEDED", "API rate limit exceeded")
  end
  if per_month > PER_MONTH then
    return refuse(429, "QUOTA_EXCEEDED", "Monthly quota exceeded")
  end
  ngx.req.set_header("x-account-id", account)
  ngx.req.clear_header("x-api-key")
end

return M
