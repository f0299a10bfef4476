-- wrk script for `make bench`: POST /v1/activity batches of spec-shaped records.
--
-- Settings come from the environment (wrk passes no arguments to setup):
--   BENCH_BATCH    records per request (1, 20, 500, ...)
--   BENCH_KEY      the x-api-key header
--   BENCH_RUN      a run id; every eventId is "<run>-<thread>-<request>-<index>",
--                  so the books can be checked on the topic afterwards
--   BENCH_SESSIONS how many distinct sessionIds to draw from (1000000), uniformly
--   BENCH_DELAY_MS mean pause before each request on a connection, to hold a lower rate
--   BENCH_FORMAT   "cafe" (our envelope) or "bridge": the Kafka REST JSON embedded
--                  format of the Strimzi bridge and Confluent's REST proxy, which the
--                  bench's peers (deploy/peer/) take; the sessionId is each record's key
-- done() prints one JSON line, prefixed "BENCH ", that bench.py reads.

local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local key = os.getenv("BENCH_KEY") or ""
local run = os.getenv("BENCH_RUN") or "run"
local sessions = tonumber(os.getenv("BENCH_SESSIONS") or "1000000")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local format = os.getenv("BENCH_FORMAT") or "cafe"

local threads = {}
local next_thread = 1

function setup(thread)
   thread:set("id", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state); globals, because done()
-- reads them through thread:get, which sees only globals.
sent = 0
statuses = {}

local head = '{"messageFormatVersion":1,"messageType":"ClientEventingActivity",'
   .. '"eventTime":"2019-01-21T13:09:07.049+05:30","productEnvironment":"monitoring",'
   .. '"productPlatform":"analytics-portal","sessionId":"'
local middle = '","eventId":"'
local tail = '","eventCategory":"GET_REPORT","eventAction":"GET_REPORT",'
   .. '"userSSOGUID":"af93d8a7e39f4680:-289a30c1:166e535a6fc:-10c2",'
   .. '"eventUri":"https://analytics-portal.example.com/","tags":[{"key":"reportType",'
   .. '"value":"reportType:risk-assessment:ui:v1"},{"key":"reportUri",'
   .. '"value":"report:risk-assessment:all"}]}'

function init(args)
   math.randomseed(id * 7919)
   wrk.method = "POST"
   if format == "bridge" then
      wrk.headers["Content-Type"] = "application/vnd.kafka.json.v2+json"
   else
      wrk.headers["Content-Type"] = "application/json"
      wrk.headers["x-api-key"] = key
   end
end

-- Session n's id, shaped like the spec's sample (a UUID): its first group scrambles n
-- and its last is n, so each n has an id of its own. Formatted for each record: 0.10 µs,
-- against 0.08 for the "session-<n>" of before (LuaJIT in wrk), where a table of a
-- million ids would cost each wrk thread 77 MB and 0.34 s at start.
local function session_id(n)
   return string.format("%08x-c58c-4165-98f2-%012x", (n * 2654435761) % 4294967296, n)
end

function request()
   sent = sent + 1
   local prefix = run .. "-" .. id .. "-" .. sent .. "-"
   local parts = {}
   for i = 1, batch do
      local session = session_id(math.random(sessions))
      local record = head .. session .. middle .. prefix .. i .. tail
      if format == "bridge" then
         record = '{"key":"' .. session .. '","value":' .. record .. '}'
      end
      parts[i] = record
   end
   return wrk.format(nil, nil, nil, '{"records":[' .. table.concat(parts, ",") .. ']}')
end

-- Exponentially distributed pauses (mean BENCH_DELAY_MS): arrivals like independent
-- clients', rather than every connection firing in lockstep after equal pauses.
function delay()
   if delay_ms == 0 then
      return 0
   end
   return delay_ms * -math.log(1 - math.random())
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local counts = {}
   for _, thread in ipairs(threads) do
      local thread_statuses = thread:get("statuses")
      for status, n in pairs(thread_statuses) do
         counts[tostring(status)] = (counts[tostring(status)] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(counts) do
      table.insert(parts, string.format('"%s":%d', status, n))
   end
   io.write(string.format(
      'BENCH {"requests":%d,"duration_us":%d,"errors":%d,"timeouts":%d,'
         .. '"p50_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"statuses":{%s}}\n',
      summary.requests, summary.duration,
      summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status,
      summary.errors.timeout,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max,
      table.concat(parts, ",")))
end
