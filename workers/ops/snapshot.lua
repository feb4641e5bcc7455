-- A consistent read of the broker's figures, in one script (Redis runs it atomically).
-- KEYS[1] = namespace; ARGV = queue names (canonical, without .DQ).
-- Returns, per queue: {name, ready, delayed, in_flight, dead, oldest_ready_timestamp_ms or -1},
-- then the heartbeats {broker_id, last_heartbeat_ms, ...} (producers heartbeat too),
-- then the registered workers {broker_id, json_info, ...}.
local namespace = KEYS[1]
local scan_limit = 10000
local result = {}
-- In flight: the unacknowledged set of every broker id with a heartbeat (Dramatiq keys them
-- "__acks__.<broker id>.<queue>", and its maintenance drops a heartbeat only once that id
-- holds nothing), so no KEYS scan: the cost follows the number of processes.
local heartbeats = redis.call("zrange", namespace .. ":__heartbeats__", 0, -1, "withscores")
for _, queue in ipairs(ARGV) do
    local list = namespace .. ":" .. queue
    local messages = list .. ".msgs"
    local ready = redis.call("llen", list)
    local delayed = redis.call("hlen", list .. ".DQ.msgs")
    local dead = redis.call("zcard", list .. ".XQ")
    local in_flight = 0
    for i = 1, #heartbeats, 2 do
        in_flight = in_flight + redis.call("scard", namespace .. ":__acks__." .. heartbeats[i] .. "." .. queue)
    end
    local oldest = -1
    local ids = redis.call("lrange", list, 0, scan_limit - 1)
    for _, id in ipairs(ids) do
        local body = redis.call("hget", messages, id)
        if body then
            local ok, decoded = pcall(cjson.decode, body)
            if ok and type(decoded) == "table" and type(decoded["message_timestamp"]) == "number" then
                local ts = decoded["message_timestamp"]
                if oldest < 0 or ts < oldest then
                    oldest = ts
                end
            end
        end
    end
    table.insert(result, {queue, ready, delayed, in_flight, dead, tostring(oldest)})
end
table.insert(result, heartbeats)
table.insert(result, redis.call("hgetall", namespace .. ":__workers__"))
return result
