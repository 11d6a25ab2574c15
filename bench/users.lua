-- wrk script for the strangler benchmark: many distinct users, one line of JSON results.
--
-- Usage: wrk ... -s bench/users.lua URL -- METHOD [body]
--
-- Each thread pre-builds one request per user (distinct X-User-Id, and a small JSON body
-- for POST), then cycles through them, so that nginx's split_clients and strangler's flag
-- bucketing both see a spread of users while wrk spends no time building requests.
-- done() prints a single "BENCH_JSON {...}" line that bench/run.py parses.
--
-- Pacing: with BENCH_THINK_MS set in the environment, every connection waits that many
-- milliseconds after each response before sending its next request, so that a handful of
-- connections makes a fixed, moderate load instead of saturating the proxy (latency is
-- still measured from the request's first byte). Unset, no delay() exists and wrk runs
-- flat out as before.

local USERS_PER_THREAD = 1000
local THINK_MS = tonumber(os.getenv("BENCH_THINK_MS") or "0") or 0
if THINK_MS > 0 then
   function delay()
      return THINK_MS
   end
end
local counter = 0
local requests = {}
local index = 0

function setup(thread)
   counter = counter + 1
   thread:set("thread_id", counter)
end

function init(args)
   local method = args[1] or "GET"
   local with_body = args[2] == "body"
   local tid = thread_id or 0
   for n = 1, USERS_PER_THREAD do
      local user = "user-" .. tid .. "-" .. n
      local headers = { ["X-User-Id"] = user }
      local body = nil
      if with_body then
         headers["Content-Type"] = "application/json"
         body = '{"user_id":"' .. user .. '","prompt":"What is the weather in Paris?"}'
      end
      requests[n] = wrk.format(method, nil, headers, body)
   end
end

function request()
   index = index % USERS_PER_THREAD + 1
   return requests[index]
end

-- Percentiles at which the latency curve is sampled, so that runs of several wrk
-- processes (the direct path drives both backends at once) can be merged.
local GRID = { 0.1, 0.5, 99.5, 99.9, 99.99 }
for p = 1, 99 do GRID[#GRID + 1] = p end
table.sort(GRID)

function done(summary, latency, _)
   local e = summary.errors
   local curve = {}
   for i, p in ipairs(GRID) do
      curve[i] = string.format("[%g,%d]", p, latency:percentile(p))
   end
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"curve":[%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max, table.concat(curve, ",")))
end
