-- One queue-depth sample for the status page's chart, taken by at most one worker per interval.
-- KEYS[1] = namespace; ARGV = {now_ms, interval_ms, retention_ms, queue...}.
-- Returns 1 when this call stored a sample, 0 when another worker holds the interval.
local namespace = KEYS[1]
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local stats = namespace .. ":__stats__"
-- The slot: N workers ticking at their own pace store one sample per interval between them.
if not redis.call("set", stats .. ":depth_claim", ARGV[1], "NX", "PX", interval) then
    return 0
end
-- In flight: the unacknowledged sets of every broker id with a heartbeat (Dramatiq keys
-- them "__acks__.<broker id>.<queue>"), found without KEYS so the cost follows the
-- number of processes, not the size of the database.
local broker_ids = redis.call("zrange", namespace .. ":__heartbeats__", 0, -1)
local queues = {}
for i = 4, #ARGV do
    local queue = ARGV[i]
    local list = namespace .. ":" .. queue
    local in_flight = 0
    for _, broker_id in ipairs(broker_ids) do
        in_flight = in_flight + redis.call("scard", namespace .. ":__acks__." .. broker_id .. "." .. queue)
    end
    -- In the order of QUEUE_STATES (workers/ops/snapshot.py): ready, delayed, in flight, dead.
    queues[queue] = {
        redis.call("llen", list),
        redis.call("hlen", list .. ".DQ.msgs"),
        in_flight,
        redis.call("zcard", list .. ".XQ"),
    }
end
local depth = stats .. ":depth"
redis.call("zadd", depth, now, cjson.encode({t = now, q = queues}))
redis.call("zremrangebyscore", depth, "-inf", now - retention)
redis.call("pexpire", depth, retention)
return 1
