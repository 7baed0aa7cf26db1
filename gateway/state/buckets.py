"""State shared by gateway replicas: the token buckets.

Two backends behind one small interface. `MemoryStore` keeps the buckets in this process (one
gateway). `RedisStore` keeps them in Redis and checks and charges all of a request's buckets in
one Lua script, on Redis's clock, so N replicas enforce one global limit rather than N; when
Redis is slow or gone it serves on local buckets behind a circuit breaker and pays Redis back
when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
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


# KEYS: bucket keys, then (when ARGV[4] is not empty) the key of this charge's id. ARGV: cost,
# need, enforce (0/1), charge id, then per_minute and burst per bucket. A charge whose id was
# seen already is not applied again: a call that timed out on the client may still run in Redis
# later, and is then replayed with the same id. Returns: admitted (0/1), the longest wait in
# seconds, then each bucket's level, as strings (Redis would truncate Lua numbers to integers).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost, need, enforce, op = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
local n = #KEYS
if op ~= '' then n = n - 1 end
local levels, rates, bursts = {}, {}, {}
for i = 1, n do
  local rate, burst = tonumber(ARGV[3 + 2 * i]) / 60, tonumber(ARGV[4 + 2 * i])
  local v = redis.call('HMGET', KEYS[i], 'level', 'stamp')
  local level, stamp = tonumber(v[1]) or burst, tonumber(v[2]) or now
  if now > stamp then level = math.min(burst, level + (now - stamp) * rate) end
  levels[i], rates[i], bursts[i] = level, rate, burst
end
local wait = 0
if enforce then
  for i = 1, n do
    local w = (math.min(need, bursts[i]) - levels[i]) / rates[i]
    if w > wait then wait = w end
  end
end
local charge = wait <= 0
if charge and op ~= '' then
  charge = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', 86400) ~= false
end
local out = {wait > 0 and 0 or 1, tostring(wait)}
for i = 1, n do
  if charge then
    levels[i] = math.min(bursts[i], levels[i] - cost)
  end
  redis.call('HSET', KEYS[i], 'level', tostring(levels[i]), 'stamp', tostring(now))
  redis.call('EXPIRE', KEYS[i], math.ceil(2 * bursts[i] / rates[i]) + 60)
  out[#out + 1] = tostring(levels[i])
end
return out
"""


class RedisStore:
    """Buckets in Redis, behind a circuit breaker.

    Each call waits at most `timeout_s`. After `open_after` failures in a row the breaker opens:
    the gateway serves on buckets of its own (`MemoryStore`, this replica's view) without
    waiting for Redis, and a background task pings Redis every `probe_interval_s`. What it
    charges meanwhile is kept, each charge with an id; when Redis answers again they are applied
    there, then the breaker closes. Every charge carries its id to Redis, which applies an id
    once: a call that timed out here may still run there later, and its replay is then a no-op,
    so an outage neither forgives nor double-charges.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "fairway:",
        *,
        timeout_s: float = 0.25,
        open_after: int = 3,
        probe_interval_s: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        import redis.asyncio as aioredis  # only deployments with Redis need the client
        from redis.exceptions import RedisError

        self.redis = aioredis.from_url(url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)  # fmt: skip
        self.prefix = prefix
        self._admit = self.redis.register_script(_ADMIT)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.timeout_s = timeout_s
        self.open_after = open_after
        self.probe_interval_s = probe_interval_s
        self.on_change = on_change
        self.up = True
        self.failures = 0  # in a row
        self.local = MemoryStore()
        # Charges made while Redis did not answer, by id: replayed there once it does.
        self.owed: dict[str, tuple[Keyed, float]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        self._probe: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("fairway.state")

    async def _run(
        self, keys: Keyed, cost: float, need: float, enforce: bool, op: str = ""
    ) -> tuple[bool, float, list[float]]:
        argv: list[str] = [repr(cost), repr(need), "1" if enforce else "0", op]
        for _, limit in keys:
            argv += [repr(limit.per_minute), repr(limit.burst)]
        rkeys = [self.prefix + "bucket:" + k for k, _ in keys]
        if op:
            rkeys.append(self.prefix + "charge:" + op)
        async with asyncio.timeout(self.timeout_s * 2):  # connect, then the call
            reply = await self._admit(keys=rkeys, args=argv)
        ok, wait, *levels = reply
        return int(ok) == 1, float(wait), [float(x) for x in levels]

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.log.warning("bucket_store_error", error=str(exc) or type(exc).__name__,
                         failures=self.failures)  # fmt: skip
        if self.up and self.failures >= self.open_after:
            self.up = False
            self.log.error("bucket_store_down", serving="local buckets")
            if self.on_change is not None:
                self.on_change(False)
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    def _op(self) -> str:
        """An id for one charge, unique across replicas."""
        return f"{self._id_prefix}-{next(self._ids):x}"

    def _local(self, keys: Keyed, cost: float, need: float, enforce: bool, op: str) -> Verdict:
        v = self.local.admit_at(keys, cost, need, enforce, time.monotonic())
        if v.admitted:
            self.owed[op] = (keys, cost)
        return v

    async def _recover(self) -> None:
        """Ping Redis until it answers, pay what was charged locally, close the breaker."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self.redis.ping()
                while self.owed:
                    op, (keys, tokens) = next(iter(self.owed.items()))
                    await self._run(keys, tokens, 0.0, False, op)
                    del self.owed[op]  # only once Redis has it: a failure replays it whole
            except self._errors as exc:
                self.log.warning("bucket_store_probe_failed", error=str(exc) or type(exc).__name__)
                continue
            self.up, self.failures = True, 0
            self.local = MemoryStore()
            self.log.warning("bucket_store_up")
            if self.on_change is not None:
                self.on_change(True)
            return

    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        if not keys:
            return Verdict(True)
        op = self._op()
        if not self.up:
            return self._local(keys, cost, need, enforce, op)
        try:
            ok, wait, levels = await self._run(keys, cost, need, enforce, op)
        except self._errors as exc:
            self._failed(exc)
            return self._local(keys, cost, need, enforce, op)
        self.failures = 0
        # Rebuild the buckets as they now are to derive the headers the same way as in memory.
        buckets = [(k, lim, Bucket(lv, 0.0)) for (k, lim), lv in zip(keys, levels, strict=True)]
        v = decide(buckets, 0.0, 0.0, False, 0.0)
        return Verdict(ok, wait, v.limit, v.remaining, v.reset_s)

    async def settle(self, keys: Keyed, delta: float) -> None:
        if not keys:
            return
        op = self._op()
        if self.up:
            try:
                await self._run(keys, delta, 0.0, False, op)
                self.failures = 0
                return
            except self._errors as exc:
                self._failed(exc)
        self._local(keys, delta, 0.0, False, op)

    async def levels(self, keys: Keyed) -> list[float]:
        if not keys:
            return []
        if not self.up:
            return await self.local.levels(keys)
        try:
            return (await self._run(keys, 0.0, 0.0, False))[2]
        except self._errors:
            return [float("nan")] * len(keys)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.redis.aclose()
