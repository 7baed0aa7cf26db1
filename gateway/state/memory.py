"""Token buckets in this process: one gateway's, or a replica's own while Redis is away.

Concurrency (`max_concurrent`) is a count of requests under way per key, seen by the bucket code
as a bucket that never refills.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.core.admission import (
    CONCURRENT,
    Bucket,
    Keyed,
    Limit,
    Verdict,
    amounts,
    check_and_charge,
    decide,
)

# The verdict on a request with no bucket at all (frozen: one instance serves them all).
ADMITTED = Verdict(True)


class MemoryStore:
    """Buckets in this process. Concurrency is a count per key (`held`), seen by the bucket
    code as a bucket that never refills, of `max_concurrent` less the count."""

    def __init__(self, held: dict[str, int] | None = None) -> None:
        self.buckets: dict[str, Bucket] = {}
        self.held: dict[str, int] = {} if held is None else held

    def _get(self, keys: Keyed, now: float) -> list[tuple[str, Limit, Bucket]]:
        out = []
        for key, limit in keys:
            if limit.unit == CONCURRENT:
                out.append((key, limit, Bucket(limit.burst - self.held.get(key, 0), now)))
                continue
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = Bucket.full(limit, now)
            out.append((key, limit, b))
        return out

    def _put(self, got: list[tuple[str, Limit, Bucket]]) -> None:
        for key, limit, b in got:
            if limit.unit == CONCURRENT:
                n = round(limit.burst - b.level)
                if n > 0:
                    self.held[key] = n
                else:
                    self.held.pop(key, None)

    def admit_at(self, keys: Keyed, cost: float, need: float, enforce: bool, now: float) -> Verdict:
        """`admit` on a given clock: the cluster simulator's."""
        if not keys:  # a tenant without rates or limits: nothing to check or charge
            return ADMITTED
        got = self._get(keys, now)
        v = decide(got, cost, need, enforce, now)
        self._put(got)
        return v

    def charge_at(self, keys: Keyed, charges: Sequence[float], now: float) -> None:
        """Charge each bucket its amount, unchecked."""
        if not keys:
            return
        got = self._get(keys, now)
        check_and_charge(got, charges, [None] * len(got), now)
        self._put(got)

    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        return self.admit_at(keys, cost, need, enforce, time.monotonic())

    async def settle(
        self, keys: Keyed, delta: float, *, requests: float = 0.0, slots: float = 0.0
    ) -> None:
        if keys:
            self.charge_at(keys, amounts(keys, delta, requests, slots), time.monotonic())

    async def levels(self, keys: Keyed) -> list[float]:
        now = time.monotonic()
        got = self._get(keys, now)
        for _, limit, b in got:
            b.refill(limit, now)
        return [b.level for _, _, b in got]

    async def close(self) -> None:
        pass
