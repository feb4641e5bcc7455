"""Per-workspace limit on refused sends, counted in Redis.

A refusal is an answer about stored data (this address is bound to another
company, this contract id exists), so a producer that may send without limit may
also enumerate. Each workspace gets ``REFUSAL_RATE_LIMIT`` refused sends per
``REFUSAL_RATE_WINDOW_SECONDS``; past that, every send of that workspace is
answered ``refusals_rate_limited`` without being checked, until the window ends.

The window is fixed, opened by the workspace's first refusal: one atomic script
increments the count and, for the first, sets the key's expiry. A refusal that
takes the count past the limit is not shown either (the limit error replaces it),
so even producers racing each other get at most the limit's worth of answers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import redis

from models.errors import BrokerUnavailable, RefusalsRateLimited
from workers.settings import Settings, get_settings

#: Connecting to Redis gives up after this long, in seconds (a producer never hangs).
REDIS_CONNECT_TIMEOUT_SECONDS = 5.0

#: One Redis command gives up after this long, in seconds.
REDIS_SOCKET_TIMEOUT_SECONDS = 5.0

#: Key of a workspace's count, under the service's namespace: ``{namespace}:refusals:{workspace}``.
KEY_FORMAT = "{namespace}:refusals:{workspace_id}"

# KEYS[1] = the workspace's count; ARGV[1] = the window in milliseconds.
# Returns {count, milliseconds until the window ends}.
_RECORD_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""

# KEYS[1] = the workspace's count. Returns {count, milliseconds until the window ends}.
_READ_SCRIPT = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
return {count, redis.call('PTTL', KEYS[1])}
"""

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class RefusalLimit:
    """The limit of one service: ``limit`` refusals per ``window_seconds`` and workspace."""

    client: redis.Redis
    namespace: str
    limit: int
    window_seconds: int

    def key(self, workspace_id: str) -> str:
        """The Redis key counting ``workspace_id``'s refusals in the current window."""
        return KEY_FORMAT.format(namespace=self.namespace, workspace_id=workspace_id)

    def ensure_open(self, workspace_id: str) -> None:
        """Raise ``RefusalsRateLimited`` when the workspace used up its refusals."""
        count, ttl_ms = self._run(_READ_SCRIPT, workspace_id)
        if count >= self.limit:
            raise self._limited(workspace_id, ttl_ms)

    def record(self, workspace_id: str) -> None:
        """Count one refusal; raise ``RefusalsRateLimited`` when it is one too many to show."""
        count, ttl_ms = self._run(_RECORD_SCRIPT, workspace_id, self.window_seconds * 1000)
        if count > self.limit:
            raise self._limited(workspace_id, ttl_ms)

    def _run(self, script: str, workspace_id: str, *args: int) -> tuple[int, int]:
        try:
            count, ttl_ms = self.client.eval(script, 1, self.key(workspace_id), *args)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(
                f"the message broker cannot be reached ({type(exc).__name__}); nothing was sent"
            ) from None
        return int(count), int(ttl_ms)

    def _limited(self, workspace_id: str, ttl_ms: int) -> RefusalsRateLimited:
        # A key without expiry cannot exist (the script sets it with the first
        # count), but an answer must never say "try again in 0 seconds".
        seconds = max(1, math.ceil(ttl_ms / 1000)) if ttl_ms > 0 else self.window_seconds
        return RefusalsRateLimited(
            f"too many refused contracts for workspace {workspace_id!r} in the last "
            f"{self.window_seconds} seconds: nothing is checked or sent for it until the limit "
            f"resets; try again in {seconds} seconds",
            retry_after_seconds=seconds,
        )


def _client(url: str) -> redis.Redis:
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=REDIS_CONNECT_TIMEOUT_SECONDS,
                socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
            )
            _clients[url] = client
        return client


def refusal_limit(settings: Settings | None = None) -> RefusalLimit | None:
    """The configured limit, or None when ``REFUSAL_RATE_LIMIT`` is 0."""
    settings = settings or get_settings()
    if settings.refusal_rate_limit == 0:
        return None
    # Imported here: it may start the embedded Redis, which a limit turned off never needs.
    from workers.broker import broker_url

    return RefusalLimit(
        client=_client(settings.redis_url or broker_url(settings)),
        namespace=settings.redis_namespace,
        limit=settings.refusal_rate_limit,
        window_seconds=settings.refusal_rate_window_seconds,
    )
