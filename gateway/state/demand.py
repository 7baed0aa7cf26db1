"""Demand counted by every replica, summed in Redis: what the planner forecasts from.

Each replica counts the requests that end at it (`gateway.core.demand.Demand`) and every
`flush()` adds what it counted since the last one to Redis: one hash per series and hour,
fields `<minute>:<r|p|o>` (requests, prompt tokens, output tokens), kept eight days. A flush
that fails keeps its counts for the next one. `read()` sums every replica's counts for a
window of minutes.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

from gateway.core.demand import Demand, Key, Point

if TYPE_CHECKING:
    from redis.asyncio import Redis

KEEP_S = 8 * 24 * 3600


class SharedDemand:
    def __init__(self, redis: Redis, prefix: str, timeout_s: float = 0.25) -> None:
        from redis.exceptions import RedisError

        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        # key -> minute -> [requests, prompt, output] not yet in Redis
        self.pending: dict[Key, dict[int, list[int]]] = defaultdict(dict)

    def add(self, key: Key, minute: int, requests: int, prompt: int, output: int) -> None:
        counts = self.pending[key].setdefault(minute, [0, 0, 0])
        counts[0] += requests
        counts[1] += prompt
        counts[2] += output

    def _hash(self, key: Key, hour: int) -> str:
        model, region, klass = key
        return f"{self.prefix}demand:{model}:{region}:{klass}:{hour}"

    async def flush(self) -> None:
        """Send what was counted since the last flush; raises Redis's errors (and then keeps
        it for the next flush)."""
        if not self.pending:
            return
        sent, self.pending = self.pending, defaultdict(dict)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key, minutes in sent.items():
                pipe.sadd(self.prefix + "demand:keys", "\x1f".join(key))
                for minute, counts in minutes.items():
                    h = self._hash(key, minute // 60)
                    for short, n in zip("rpo", counts, strict=True):
                        if n:
                            pipe.hincrby(h, f"{minute}:{short}", n)
                    pipe.expire(h, KEEP_S)
            async with asyncio.timeout(self.timeout_s * 4):
                await pipe.execute()
        except BaseException:
            for key, minutes in sent.items():  # back in front of what came since
                for minute, counts in minutes.items():
                    self.add(key, minute, *counts)
            raise

    async def read(self, since: int, until: int) -> Demand:
        """Every replica's counts for minutes [since, until)."""
        async with asyncio.timeout(self.timeout_s * 8):
            raw_keys = await self.redis.smembers(self.prefix + "demand:keys")
            keys = sorted(tuple(_text(k).split("\x1f")) for k in raw_keys)
            hours = range(since // 60, (until - 1) // 60 + 1)
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                for hour in hours:
                    pipe.hgetall(self._hash((key[0], key[1], key[2]), hour))
            replies = await pipe.execute()
        out = Demand(keep_minutes=max(1, until - since))
        it = iter(replies)
        for key in keys:
            got: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
            for _hour in hours:
                for field, value in next(it).items():
                    minute_s, short = _text(field).split(":")
                    minute = int(minute_s)
                    if since <= minute < until:
                        got[minute]["rpo".index(short)] += int(value)
            k: Key = (key[0], key[1], key[2])
            out.merge(k, [Point(m, *c) for m, c in sorted(got.items())])
        return out


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
