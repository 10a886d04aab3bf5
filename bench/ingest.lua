-- wrk script of bench/ingest.py: POSTs pre-signed Slack events, each once.
--
-- The events file (INGEST_EVENTS, written by bench/ingest.py) has one event per line:
-- "<X-Slack-Request-Timestamp>\t<X-Slack-Signature>\t<JSON body>". Thread i of n sends lines
-- i, i+n, i+2n, ... as prebuilt requests; a thread that runs out starts over and counts it
-- ("wraps"): those repeats are redeliveries, so bench/ingest.py reports them and the reply
-- count would fall short.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local path = os.getenv("INGEST_EVENTS")
   local path_url = os.getenv("INGEST_PATH") or "/slack/events"
   local nthreads = tonumber(os.getenv("INGEST_THREADS") or "1")
   requests_ = {}
   local n = 0
   for line in io.lines(path) do
      if n % nthreads == id then
         local ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
         local headers = {
            ["Content-Type"] = "application/json",
            ["X-Slack-Request-Timestamp"] = ts,
            ["X-Slack-Signature"] = sig,
         }
         table.insert(requests_, wrk.format("POST", path_url, headers, body))
      end
      n = n + 1
   end
   next_ = 1
   wraps = 0
end

function request()
   local r = requests_[next_]
   next_ = next_ + 1
   if next_ > #requests_ then
      next_ = 1
      wraps = wraps + 1
   end
   return r
end

function done(summary, latency, requests)
   local wrapped = 0
   for _, thread in ipairs(threads) do
      wrapped = wrapped + (thread:get("wraps") or 0)
   end
   io.write(string.format(
      'INGEST_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
         .. '"status_errors": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
         .. '"timeouts": %d, "wraps": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
      summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
      summary.errors.timeout, wrapped))
end
