"""State shared by gateway replicas: the token buckets and the hard limits.

Two backends behind one small interface, `BucketStore`. `MemoryStore` (gateway.state.memory)
keeps the buckets in this process (one gateway). `RedisStore` (gateway.state.redis_store) keeps
them in Redis and checks and charges all of a request's buckets, soft and hard, requests and
concurrency included, in one Lua script, on Redis's clock, so N replicas enforce one global
limit rather than N; when Redis is slow or gone it serves on local buckets behind a circuit
breaker and pays Redis back when it returns.
"""

from __future__ import annotations

from typing import Protocol

from gateway.core.admission import Keyed, Verdict
from gateway.state.memory import MemoryStore
from gateway.state.redis_store import RedisStore

# The backends are named here with their interface: the gateway picks one by its config.
__all__ = ["BucketStore", "MemoryStore", "RedisStore"]


class BucketStore(Protocol):
    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        """Check (hard buckets always, soft ones when `enforce`) and charge a request of
        `cost` tokens to every bucket, all or nothing (`admission.plan`)."""
        ...

    async def settle(
        self, keys: Keyed, delta: float, *, requests: float = 0.0, slots: float = 0.0
    ) -> None:
        """Correct an earlier charge by `delta` tokens once the real usage is known, and by
        `requests` and concurrency `slots` (-1: given back)."""
        ...

    async def levels(self, keys: Keyed) -> list[float]:
        """Tokens in each bucket now, for the admin view."""
        ...

    async def close(self) -> None: ...
