"""Token buckets in Redis, shared by every gateway replica, behind a circuit breaker.

`RedisStore` checks and charges all of a request's buckets, soft and hard, requests and
concurrency included, in one Lua script (gateway.state.lua), on Redis's clock, so N replicas
enforce one global limit rather than N; when Redis is slow or gone it serves on local buckets
(gateway.state.memory) and pays Redis back when it returns.

A concurrency limit (`max_concurrent`) counts requests under way, which a replica that dies
never gives back: in Redis each replica's count sits in its own field of the limit's hash, and
counts only while the replica's lease (refreshed by a heartbeat) lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from gateway.core.admission import (
    CONCURRENT,
    Bucket,
    Keyed,
    Limit,
    Verdict,
    amounts,
    plan,
    summarize,
)
from gateway.state.lua import ADMIT, BEAT
from gateway.state.memory import ADMITTED, MemoryStore

Charges = list[tuple[str, Limit, float]]  # bucket, its shape, what to charge it

_UNIT = {"tokens": "t", "requests": "r", "concurrent": "c"}


class RedisStore:
    """Buckets in Redis, behind a circuit breaker.

    Each call waits at most `timeout_s`. After `open_after` failures in a row the breaker opens:
    the gateway serves on buckets of its own (`MemoryStore`, this replica's view) without
    waiting for Redis, and a background task pings Redis every `probe_interval_s`. What it
    charges meanwhile is kept, each charge with an id; when Redis answers again they are applied
    there, then the breaker closes. Every charge carries its id to Redis, which applies an id
    once: a call that timed out here may still run there later, and its replay is then a no-op,
    so an outage neither forgives nor double-charges.

    Concurrency is not replayed but restated: this replica knows the requests it holds
    (`held`), and after a call whose outcome it does not know, when its lease had run out, and
    when the breaker closes, it writes that count whole to Redis. A restate waits for this
    replica's calls under way to end and holds back new ones meanwhile, and claims the ids of
    the calls of unknown outcome, so that the count written is exact. The lease (`lease_s`,
    refreshed every third of it) keeps the replica's counts alive in the others' view; a
    replica that dies stops counting when its lease runs out.
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
        lease_s: float = 10.0,
    ) -> None:
        import redis.asyncio as aioredis  # only deployments with Redis need the client
        from redis.exceptions import RedisError

        self.redis = aioredis.from_url(url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)  # fmt: skip
        self.prefix = prefix
        self._admit = self.redis.register_script(ADMIT)
        self._beat_script = self.redis.register_script(BEAT)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.timeout_s = timeout_s
        self.open_after = open_after
        self.probe_interval_s = probe_interval_s
        self.on_change = on_change
        self.lease_s = lease_s
        self.up = True
        self.failures = 0  # in a row
        # Concurrency held by this replica, by key: shared with the local buckets.
        self.held: dict[str, int] = {}
        self.local = MemoryStore(self.held)
        # Charges made while Redis did not answer, by id: replayed there once it does.
        self.owed: dict[str, tuple[Charges, float]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex()
        self.replica = self._id_prefix
        self._held_keys: set[str] = set()  # concurrency keys this replica has counted in
        self._unknown: set[str] = set()  # ids of calls with concurrency, outcome unknown
        self._restate = False  # Redis's count of `held` may be off: write it whole
        self._calls = 0  # calls with concurrency under way
        self._quiet = asyncio.Event()  # set while `_calls` is 0
        self._quiet.set()
        self._open = asyncio.Event()  # cleared while a restate runs
        self._open.set()
        self._probe: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = structlog.get_logger("fairway.state")

    def _key(self, key: str, limit: Limit) -> str:
        kind = "conc:" if limit.unit == CONCURRENT else "bucket:"
        return self.prefix + kind + key

    async def _run(
        self, charges: Charges, needs: Sequence[float | None], op: str = ""
    ) -> tuple[bool, float, int, list[float]]:
        """One call of the script; returns admitted, the wait, the index of the bucket that
        refused (-1: none) and the levels."""
        argv: list[str] = [op, self.replica, repr(self.lease_s)]
        for (_, limit, amount), need in zip(charges, needs, strict=True):
            unit = _UNIT[limit.unit]
            argv += [unit, repr(limit.per_minute), repr(limit.burst),
                     str(round(amount)) if unit == "c" else repr(amount),
                     "" if need is None else repr(need)]  # fmt: skip
        rkeys = [self._key(k, lim) for k, lim, _ in charges]
        rkeys.append(self.prefix + "leases")
        if op:
            rkeys.append(self.prefix + "charge:" + op)
        async with asyncio.timeout(self.timeout_s * 2):  # connect, then the call
            reply = await self._admit(keys=rkeys, args=argv)
        ok, wait, refused, lapsed, *levels = reply
        if int(lapsed):
            self._restate = True
        return int(ok) == 1, float(wait), int(refused) - 1, [float(x) for x in levels]

    async def _counted(
        self, charges: Charges, needs: Sequence[float | None], op: str
    ) -> tuple[bool, float, int, list[float]]:
        """`_run` for a call that changes concurrency: none runs during a restate, and one
        whose outcome stays unknown is claimed by the next."""
        await self._open.wait()
        self._calls += 1
        self._quiet.clear()
        try:
            return await self._run(charges, needs, op)
        except BaseException:
            self._unknown.add(op)
            self._restate = True
            raise
        finally:
            self._calls -= 1
            if not self._calls:
                self._quiet.set()

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

    def _hold(self, keys: Keyed, n: int) -> None:
        for key, limit in keys:
            if limit.unit == CONCURRENT:
                left = self.held.get(key, 0) + n
                if left > 0:
                    self.held[key] = left
                else:
                    self.held.pop(key, None)

    def _owe(self, op: str, keys: Keyed, charges: Sequence[float], tokens: float) -> None:
        # Concurrency is restated, not replayed.
        owed = [(k, lim, c) for (k, lim), c in zip(keys, charges, strict=True)
                if lim.unit != CONCURRENT and c]  # fmt: skip
        if owed:
            self.owed[op] = (owed, tokens)

    def _local(self, keys: Keyed, cost: float, need: float, enforce: bool, op: str) -> Verdict:
        v = self.local.admit_at(keys, cost, need, enforce, time.monotonic())
        if v.admitted:
            self._owe(op, keys, plan(keys, cost, need, enforce)[0], cost)
        return v

    async def _recover(self) -> None:
        """Ping Redis until it answers, pay what was charged locally, restate what this
        replica holds, close the breaker."""
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                async with asyncio.timeout(self.timeout_s * 2):
                    await self.redis.ping()
                while self.owed:
                    op, (charges, _) = next(iter(self.owed.items()))
                    await self._run(charges, [None] * len(charges), op)
                    del self.owed[op]  # only once Redis has it: a failure replays it whole
                    self._unknown.discard(op)  # settled by its replay
                if self._held_keys:
                    await self._heartbeat(restate=True)
            except self._errors as exc:
                self.log.warning("bucket_store_probe_failed", error=str(exc) or type(exc).__name__)
                continue
            self.up, self.failures = True, 0
            self.local = MemoryStore(self.held)
            self.log.warning("bucket_store_up")
            if self.on_change is not None:
                self.on_change(True)
            return

    async def _heartbeat(self, restate: bool) -> None:
        """Refresh this replica's lease; with `restate`, write its counts whole, once its
        calls under way have ended (new ones wait meanwhile)."""
        if not restate:
            lapsed = await self._beat_call([], [], restate=False)
            if lapsed:
                self._restate = True
            return
        self._open.clear()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s * 2):
                    await self._quiet.wait()
            self._restate = False
            keys, unknown = sorted(self._held_keys), sorted(self._unknown)
            try:
                await self._beat_call(keys, unknown, restate=True)
            except BaseException:
                self._restate = True
                raise
            self._unknown.difference_update(unknown)
            for op in unknown:  # claimed: its replay must go under a new id
                if op in self.owed:
                    self.owed[self._op()] = self.owed.pop(op)
            self._held_keys = {k for k in keys if self.held.get(k)} | (self._held_keys - set(keys))
        finally:
            self._open.set()

    async def _beat_call(self, keys: list[str], unknown: list[str], restate: bool) -> bool:
        async with asyncio.timeout(self.timeout_s * 2):
            lapsed = await self._beat_script(
                keys=[self.prefix + "leases", *(self.prefix + "conc:" + k for k in keys),
                      *(self.prefix + "charge:" + op for op in unknown)],
                args=[self.replica, repr(self.lease_s), "1" if restate else "0",
                      *(str(self.held.get(k, 0)) for k in keys)],
            )  # fmt: skip
        return bool(int(lapsed))

    async def _beats(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not self.up:
                continue
            try:
                await self._heartbeat(restate=self._restate)
            except self._errors as exc:
                self.log.warning("lease_refresh_failed", error=str(exc) or type(exc).__name__)

    def _counting(self, keys: Keyed) -> bool:
        """Whether `keys` hold concurrency; they join the heartbeat's from their first use."""
        counts = False
        for key, limit in keys:
            if limit.unit == CONCURRENT:
                counts = True
                if key not in self._held_keys:
                    self._held_keys.add(key)
                    if self._beat is None:
                        self._beat = asyncio.get_running_loop().create_task(self._beats())
        return counts

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def admit(self, keys: Keyed, cost: float, need: float, enforce: bool) -> Verdict:
        if not keys:
            return ADMITTED
        op = self._op()
        counts = self._counting(keys)
        if not self.up:
            return self._local(keys, cost, need, enforce, op)
        charges, needs = plan(keys, cost, need, enforce)
        triples = [(k, lim, c) for (k, lim), c in zip(keys, charges, strict=True)]
        self._hold(keys, 1)  # before the call: `held` never falls below Redis's count
        call = asyncio.ensure_future(
            self._counted(triples, needs, op) if counts else self._run(triples, needs, op)
        )
        try:
            ok, wait, refused, levels = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left while Redis decided: whatever it decided is given back.
            call.add_done_callback(lambda f: self._abandoned(f, keys, cost))
            raise
        except self._errors as exc:
            self._hold(keys, -1)
            self._failed(exc)
            return self._local(keys, cost, need, enforce, op)
        self.failures = 0
        if not ok:
            self._hold(keys, -1)
        buckets = [(k, lim, Bucket(lv, 0.0)) for (k, lim), lv in zip(keys, levels, strict=True)]
        return summarize(buckets, ok, wait, refused)

    def _abandoned(self, call: asyncio.Future[tuple[bool, float, int, list[float]]],
                   keys: Keyed, cost: float) -> None:  # fmt: skip
        if not call.cancelled() and call.exception() is None and call.result()[0]:
            self._spawn(self.settle(keys, -cost, requests=-1.0, slots=-1.0))
        else:
            self._hold(keys, -1)

    async def settle(
        self, keys: Keyed, delta: float, *, requests: float = 0.0, slots: float = 0.0
    ) -> None:
        charges = amounts(keys, delta, requests, slots)
        if not any(charges):
            return
        op = self._op()
        if self.up:
            triples = [(k, lim, c) for (k, lim), c in zip(keys, charges, strict=True)]
            none: list[float | None] = [None] * len(keys)
            counts = slots != 0 and self._counting(keys)
            call = asyncio.ensure_future(
                self._counted(triples, none, op) if counts else self._run(triples, none, op)
            )
            try:
                await asyncio.shield(call)
                self.failures = 0
                self._hold(keys, round(slots))  # given back only once Redis has it
                return
            except asyncio.CancelledError:
                call.add_done_callback(lambda f: self._settled(f, keys, charges, delta, slots, op))
                raise
            except self._errors as exc:
                self._failed(exc)
        self._settle_locally(keys, charges, delta, op)

    def _settled(self, call: asyncio.Future[tuple[bool, float, int, list[float]]], keys: Keyed,
                 charges: list[float], delta: float, slots: float, op: str) -> None:  # fmt: skip
        if not call.cancelled() and call.exception() is None:
            self._hold(keys, round(slots))
        else:
            self._settle_locally(keys, charges, delta, op)

    def _settle_locally(self, keys: Keyed, charges: list[float], delta: float, op: str) -> None:
        self.local.charge_at(keys, charges, time.monotonic())  # `held` included
        self._owe(op, keys, charges, delta)

    async def levels(self, keys: Keyed) -> list[float]:
        if not keys:
            return []
        if not self.up:
            return await self.local.levels(keys)
        try:
            return (await self._run([(k, lim, 0.0) for k, lim in keys], [None] * len(keys)))[3]
        except self._errors:
            return [float("nan")] * len(keys)

    async def close(self) -> None:
        for task in (self._probe, self._beat, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # Leave the others' view at once rather than when the lease runs out.
        with contextlib.suppress(*self._errors):
            async with asyncio.timeout(self.timeout_s * 2):
                for key in self._held_keys:
                    await self.redis.hdel(self.prefix + "conc:" + key, self.replica)
                await self.redis.zrem(self.prefix + "leases", self.replica)
        await self.redis.aclose()
