-- wrk script of `python -m bench ingest`: POSTs TWIN status callbacks, each with a message id never
-- sent before, for LOAD_SECONDS; then sends nothing more, so that every callback sent gets its answer
-- before wrk ends (give wrk a longer -d). Counts per thread what it sent and how it was answered.
--   wrk -t2 -c32 -d12s --latency -s bench/ingest.lua http://127.0.0.1:PORT/callbacks/TOKEN -- RUN_TAG 10
-- Thread n's message ids are RUN_TAG-n-1, RUN_TAG-n-2, ... (its "id space"); the body is TWIN's own
-- example callback (tests/examples/status-callback.json) with that id. done() prints one line,
-- "BENCH-INGEST {json}", that bench/ingest.py reads.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *now);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) / 1e9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("number", #threads)
end

function init(args)
  space = string.format("%s-%d", args[1] or "run", number)
  load_seconds = tonumber(args[2] or "10")
  sent, answered_2xx, answered_other = 0, 0, 0
  running = false
  first_sent, last_answer = 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

-- Called before each request: after LOAD_SECONDS, wait longer than wrk will run (no more requests).
function delay()
  running = true
  if sent > 0 and now() - first_sent >= load_seconds then
    return 3600 * 1000
  end
  return 0
end

local BODY = '{"id":"%s-%d","bulkId":"b973b50e-988a-4cb9-ad92-93d7cbe4d8d9",'
  .. '"groupId":"fb4c65dc-993c-430f-a68d-8fa1c149697f","flowId":"83f5d058-8ed8-47f7-bddb-dd69a9b249a8",'
  .. '"oldStatus":"PENDING","newStatus":"DELIVERED","oldStatusCode":2,"newStatusCode":6,'
  .. '"price":2.5,"partCount":1,"callbackData":"bench-ingest"}'

-- wrk also calls request() once before the load, to check what it returns: that one, never sent, is
-- not counted (id 0). Every request actually sent is preceded by a call of delay().
function request()
  if not running then
    return wrk.format(nil, nil, nil, string.format(BODY, space, 0))
  end
  if sent == 0 then
    first_sent = now()
  end
  sent = sent + 1
  return wrk.format(nil, nil, nil, string.format(BODY, space, sent))
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    answered_2xx = answered_2xx + 1
  else
    answered_other = answered_other + 1
  end
  last_answer = now()
end

function done(summary, latency, requests)
  local spaces = {}
  for _, thread in ipairs(threads) do
    table.insert(spaces, string.format('{"space":"%s","sent":%d,"2xx":%d,"other":%d,"first_sent":%.6f,'
      .. '"last_answer":%.6f}', thread:get("space"), thread:get("sent"), thread:get("answered_2xx"),
      thread:get("answered_other"), thread:get("first_sent"), thread:get("last_answer")))
  end
  local e = summary.errors
  io.write(string.format('BENCH-INGEST {"requests":%d,"errors":{"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d},"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"spaces":[%s]}\n',
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(spaces, ",")))
end
