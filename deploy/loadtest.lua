-- wrk script: POST a distinct TWIN status callback per request (ids never repeat, so none is a duplicate).
-- wrk -t2 -c16 -d10s -s deploy/loadtest.lua http://127.0.0.1:8000/callbacks/<CALLBACK_TOKEN>
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  statuses = {}
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"id":"load-%d-%d-%d","oldStatus":"PENDING","newStatus":"DELIVERED","newStatusCode":200,"callbackData":"load"}',
    tid, os.time(), counter)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      io.write(string.format("status %s: %d\n", code, n))
    end
  end
  io.write(string.format("p50 %.1f ms  p99 %.1f ms\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
