-- wrk script for scripts/bench: sends the session cookie (BENCH_COOKIE), optionally
-- "Connection: close" (BENCH_CLOSE=1), and checks every response: a status other than
-- 200 or a body other than BENCH_BODY is counted, and the run is then INVALID.
-- done() prints one line "BENCHJSON {...}" (and "BENCHBAD ..." with a sample) for bench.py.

local cookie = os.getenv("BENCH_COOKIE") or ""
local expected = os.getenv("BENCH_BODY") or ""
local close = os.getenv("BENCH_CLOSE") == "1"
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok = 0
  bad_status = 0
  bad_body = 0
  first_bad = ""
  if cookie ~= "" then
    wrk.headers["Cookie"] = cookie
  end
  if close then
    wrk.headers["Connection"] = "close"
  end
end

function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
  elseif body ~= expected then
    bad_body = bad_body + 1
  else
    ok = ok + 1
    return
  end
  if first_bad == "" then
    local loc = headers["Location"] or headers["location"] or ""
    first_bad = tostring(status) .. " " .. loc .. " " .. string.sub(body or "", 1, 120)
  end
end

function done(summary, latency, requests)
  local n_ok, n_status, n_body, sample = 0, 0, 0, ""
  for _, t in ipairs(threads) do
    n_ok = n_ok + t:get("ok")
    n_status = n_status + t:get("bad_status")
    n_body = n_body + t:get("bad_body")
    if sample == "" then
      sample = t:get("first_bad") or ""
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "bytes": %d, "ok": %d, "bad_status": %d, '
      .. '"bad_body": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, n_ok, n_status, n_body,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
  if sample ~= "" then
    io.write("BENCHBAD " .. string.gsub(sample, "[^%w%p ]", "?") .. "\n")
  end
end
