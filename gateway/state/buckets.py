"""State shared by gateway replicas: the token buckets.

Two backends behind one small interface. `MemoryStore` keeps the buckets in this process (one
gateway). `RedisStore` keeps them in Redis and checks and charges all of a request's buckets in
one Lua script, on Redis's clock, so N replicas enforce one global limit rather than N.
"""

from __future__ import annotations

import time
from typing import Protocol

import structlog

from gateway.core.admission import Bucket, Keyed, Limit, Verdict, decide


class BucketStore(Protocol):
    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        """Check (when `enforce`) and charge `cost` tokens to every bucket, all or nothing."""
        ...

    async def settle(self, keys: Keyed, delta: float) -> None:
        """Correct an earlier charge by `delta` tokens once the real usage is known."""
        ...

    async def levels(self, keys: Keyed) -> list[float]:
        """Tokens in each bucket now, for the admin view."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    def __init__(self) -> None:
        self.buckets: dict[str, Bucket] = {}

    def _get(self, keys: Keyed, now: float) -> list[tuple[str, Limit, Bucket]]:
        out = []
        for key, limit in keys:
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = Bucket.full(limit, now)
            out.append((key, limit, b))
        return out

    def admit_at(self, keys: Keyed, cost: float, need: float, enforce: bool, now: float) -> Verdict:
        """`admit` on a given clock: the cluster simulator's."""
        return decide(self._get(keys, now), cost, need, enforce, now)

    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        return self.admit_at(keys, cost, need, enforce, time.monotonic())

    async def settle(self, keys: Keyed, delta: float) -> None:
        self.admit_at(keys, delta, 0.0, False, time.monotonic())

    async def levels(self, keys: Keyed) -> list[float]:
        now = time.monotonic()
        got = self._get(keys, now)
        for _, limit, b in got:
            b.refill(limit, now)
        return [b.level for _, _, b in got]

    async def close(self) -> None:
        pass


# KEYS: bucket keys. ARGV: cost, need, enforce (0/1), then per_minute and burst per key.
# Returns: admitted (0/1), the longest wait in seconds, then each bucket's level, as strings
# (Redis would truncate Lua numbers to integers).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost, need, enforce = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local levels, rates, bursts = {}, {}, {}
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 + 2 * i]) / 60, tonumber(ARGV[3 + 2 * i])
  local v = redis.call('HMGET', key, 'level', 'stamp')
  local level, stamp = tonumber(v[1]) or burst, tonumber(v[2]) or now
  if now > stamp then level = math.min(burst, level + (now - stamp) * rate) end
  levels[i], rates[i], bursts[i] = level, rate, burst
end
local wait = 0
if enforce then
  for i = 1, #KEYS do
    local w = (math.min(need, bursts[i]) - levels[i]) / rates[i]
    if w > wait then wait = w end
  end
end
local out = {wait > 0 and 0 or 1, tostring(wait)}
for i, key in ipairs(KEYS) do
  if wait <= 0 then
    levels[i] = math.max(-bursts[i], math.min(bursts[i], levels[i] - cost))
  end
  redis.call('HSET', key, 'level', tostring(levels[i]), 'stamp', tostring(now))
  redis.call('EXPIRE', key, math.ceil(2 * bursts[i] / rates[i]) + 60)
  out[#out + 1] = tostring(levels[i])
end
return out
"""


class RedisStore:
    """Buckets in Redis. If Redis cannot be reached the gateway fails open: requests are
    admitted unthrottled (and the error logged) rather than refused for an outage that is not
    the client's."""

    def __init__(self, url: str, prefix: str = "fairway:") -> None:
        import redis.asyncio as aioredis  # only deployments with Redis need the client
        from redis.exceptions import RedisError

        self.redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = prefix
        self._admit = self.redis.register_script(_ADMIT)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self.log = structlog.get_logger("fairway.state")

    async def _run(
        self, keys: Keyed, cost: float, need: float, enforce: bool
    ) -> tuple[bool, float, list[float]]:
        argv: list[str] = [repr(cost), repr(need), "1" if enforce else "0"]
        for _, limit in keys:
            argv += [repr(limit.per_minute), repr(limit.burst)]
        reply = await self._admit(keys=[self.prefix + "bucket:" + k for k, _ in keys], args=argv)
        ok, wait, *levels = reply
        return int(ok) == 1, float(wait), [float(x) for x in levels]

    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        if not keys:
            return Verdict(True)
        try:
            ok, wait, levels = await self._run(keys, cost, need, enforce)
        except self._errors as exc:
            self.log.warning("bucket_store_unavailable", error=str(exc))
            return Verdict(True)
        # Rebuild the buckets as they now are to derive the headers the same way as in memory.
        buckets = [(k, lim, Bucket(lv, 0.0)) for (k, lim), lv in zip(keys, levels, strict=True)]
        v = decide(buckets, 0.0, 0.0, False, 0.0)
        return Verdict(ok, wait, v.limit, v.remaining, v.reset_s)

    async def settle(self, keys: Keyed, delta: float) -> None:
        if keys:
            try:
                await self._run(keys, delta, 0.0, False)
            except self._errors as exc:
                self.log.warning("bucket_store_unavailable", error=str(exc))

    async def levels(self, keys: Keyed) -> list[float]:
        if not keys:
            return []
        try:
            return (await self._run(keys, 0.0, 0.0, False))[2]
        except self._errors:
            return [float("nan")] * len(keys)

    async def close(self) -> None:
        await self.redis.aclose()
