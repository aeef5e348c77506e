-- wrk script of bench/run.sh. Environment:
--   BENCH_MODE   valid | abusive | bogus | bogus_repeat | jwt
--   BENCH_KEYS   file with one API key per line (valid, abusive)
--   BENCH_TOKEN  console JWT (jwt)
--   BENCH_CLOSE  1: "connection: close" on every request
--   BENCH_DELAY_MS  pause of each connection between a response and its next request (0: none);
--                   used to run a fixed, lower request rate ("half of peak").
-- valid: round robin over all keys, each wrk thread starting at its own offset, so that every
-- key is used exactly once per #keys requests (per-key rate = total rate / #keys).

local mode = os.getenv("BENCH_MODE") or "valid"
local token = os.getenv("BENCH_TOKEN") or ""
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
-- BENCH_CLOSE=1: every request asks for the connection to close (a new connection, and over
-- TLS a new handshake, per request).
local close = os.getenv("BENCH_CLOSE") == "1"
local body = '{"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","to":"+33612345000","type":"text","text":"Hello"}'
local path = "/api/v1/messages/send"
local keys = {}
local idx = 0
local threads_n = 0
local bogus_fixed = "msgf_live_" .. string.rep("0123456789abcdef", 4)
local hex = {"0","1","2","3","4","5","6","7","8","9","a","b","c","d","e","f"}

function setup(thread)
  thread:set("thread_id", threads_n)
  threads_n = threads_n + 1
end

function init(args)
  local id = thread_id or 0
  math.randomseed(os.time() * 1000 + id)
  local file = os.getenv("BENCH_KEYS")
  if file and file ~= "" then
    for line in io.lines(file) do
      if #line > 0 then keys[#keys + 1] = line end
    end
  end
  if (mode == "valid" or mode == "abusive") and #keys == 0 then
    error("BENCH_KEYS is empty or missing")
  end
  idx = (id * 3331) % math.max(#keys, 1)
end

local function random_key()
  local t = {}
  for i = 1, 64 do t[i] = hex[math.random(16)] end
  return "msgf_live_" .. table.concat(t)
end

function request()
  if mode == "valid" then
    idx = idx % #keys + 1
    local headers = {["x-api-key"] = keys[idx], ["content-type"] = "application/json"}
    if close then headers["connection"] = "close" end
    return wrk.format("POST", path, headers, body)
  elseif mode == "abusive" then
    return wrk.format("POST", path, {["x-api-key"] = keys[1], ["content-type"] = "application/json"}, body)
  elseif mode == "bogus" then
    return wrk.format("POST", path, {["x-api-key"] = random_key(), ["content-type"] = "application/json"}, body)
  elseif mode == "bogus_repeat" then
    return wrk.format("POST", path, {["x-api-key"] = bogus_fixed, ["content-type"] = "application/json"}, body)
  elseif mode == "jwt" then
    return wrk.format("GET", "/api/dashboard", {["authorization"] = "Bearer " .. token}, nil)
  end
  error("unknown BENCH_MODE " .. mode)
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end
