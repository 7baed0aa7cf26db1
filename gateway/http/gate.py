"""The gate in front of the proxy: throttle (OIT), then wait for a slot in the fairness queue.

The thin asyncio shell around `gateway.core.gate.GateCore`: it charges the token buckets
(an async store, in memory or Redis), and a waiting request is a future that the core's
dispatcher resolves when the policy picks it. A client that goes away while waiting leaves
the queue at once (aiohttp cancels its handler); nothing waits longer than
`fairness.queue_timeout_s`.
"""

from __future__ import annotations

import asyncio
import math
import time

from gateway.config.schema import Config
from gateway.core.admission import Verdict, ratelimit_headers
from gateway.core.dispatch import Decision, Dispatcher
from gateway.core.errors import ApiError
from gateway.core.gate import Fleet, GateCore, Router, Slot
from gateway.core.request import RequestInfo
from gateway.obs.metrics import GatewayMetrics
from gateway.state.buckets import BucketStore


class Pass:
    """A request let through the gate: its slot in the core, and the rate-limit headers
    its response carries."""

    __slots__ = ("headers", "slot")

    def __init__(self, slot: Slot, headers: dict[str, str]) -> None:
        self.slot = slot
        self.headers = headers

    @property
    def engine(self) -> str:
        return self.slot.engine


class Gate:
    def __init__(
        self, cfg: Config, fleet: Fleet, router: Router, store: BucketStore, metrics: GatewayMetrics
    ) -> None:
        self.core = GateCore(cfg, fleet, router)
        self.store = store
        self.metrics = metrics
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def cfg(self) -> Config:
        return self.core.cfg

    @property
    def dispatcher(self) -> Dispatcher:
        return self.core.dispatcher

    async def enter(self, info: RequestInfo) -> Pass:
        """Admit `info` and wait for its slot; raises ApiError 429 or 503 when it may not go."""
        now = time.perf_counter()
        core, cfg = self.core, self.core.cfg
        a = core.prepare(info, now)
        verdict = await self.store.admit(a.keys, a.cost, a.need, a.enforce)
        headers = ratelimit_headers(verdict)
        if not verdict.admitted:
            self.metrics.throttled.labels(info.tenant, info.app).inc()
            raise self._throttled(info, verdict, headers)
        decision, slot = core.submit(info, a, time.perf_counter())
        p = Pass(slot, headers)
        if decision is Decision.START:
            return p
        if decision is Decision.UNAVAILABLE:
            await self.store.settle(a.keys, -a.cost)
            raise ApiError(
                503,
                f"No healthy engine can serve model '{info.model}' right now; retry shortly.",
                code="no_healthy_engine",
                headers={**headers, "Retry-After": str(cfg.server.retry_after_s)},
            )
        if decision is Decision.FULL:
            await self.store.settle(a.keys, -a.cost)
            self.metrics.dropped.labels(info.tenant, "queue_full").inc()
            raise ApiError(
                429,
                f"Tenant '{info.tenant}' already has {cfg.fairness.max_queue_per_tenant} "
                f"requests waiting for model '{info.model}'; retry later.",
                code="queue_full",
                headers={**headers, "Retry-After": str(cfg.server.retry_after_s)},
            )
        self._arm_timer(info.model)
        return await self._wait(p)

    async def _wait(self, p: Pass) -> Pass:
        slot = p.slot
        slot.payload = fut = asyncio.get_running_loop().create_future()
        model, timeout = slot.info.model, self.cfg.fairness.queue_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await fut
            return p
        except ApiError:  # the gateway is stopping (`fail_waiting`)
            if self.core.cancel(slot):
                await self.store.settle(slot.keys, -slot.cost)
            else:
                await self.leave(p, None, None)
            raise
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not self.core.cancel(slot):
                # Picked in the same instant: give the slot back to the next in line.
                await self.leave(p, None, None)
            else:
                await self.store.settle(slot.keys, -slot.cost)
            reason = "client_gone" if isinstance(exc, asyncio.CancelledError) else "timeout"
            self.metrics.dropped.labels(slot.info.tenant, reason).inc()
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = (
                "stayed saturated"
                if self.core.snapshots(model)
                else "was ejected or drained (no engine took new requests)"
            )
            raise ApiError(
                503,
                f"Every engine of model '{model}' {why} for {timeout:g} s while this request "
                "waited in the queue; retry later.",
                code="queue_timeout",
                headers={**p.headers, "Retry-After": str(self.cfg.server.retry_after_s)},
            ) from None

    def _throttled(self, info: RequestInfo, v: Verdict, headers: dict[str, str]) -> ApiError:
        wait = max(1, math.ceil(v.retry_after_s))
        return ApiError(
            429,
            f"Rate limit reached for tenant '{info.tenant}' (application '{info.app}') while "
            f"model '{info.model}' is overloaded: limit {headers.get('x-ratelimit-limit-tokens')}"
            f" tokens per minute, remaining {headers.get('x-ratelimit-remaining-tokens')}. "
            f"Retry after {wait} s.",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(wait)},
        )

    def on_tokens(self, p: Pass, n: int) -> None:
        self.core.on_tokens(p.slot, n)

    def reroute(self, p: Pass, tried: list[str]) -> str | None:
        """Move the request to another engine after its engine failed before answering."""
        return self.core.reroute(p.slot, tried, time.perf_counter())

    async def leave(self, p: Pass, prompt_tokens: int | None, output_tokens: int | None) -> None:
        """The request ended: settle counters and buckets with real usage, free its slot."""
        slot = p.slot
        if slot.done:
            return
        started, delta = self.core.finish(slot, prompt_tokens, output_tokens, time.perf_counter())
        self._wake(started)
        if delta:
            await self.store.settle(slot.keys, delta)

    def _wake(self, started: list[Slot]) -> None:
        for slot in started:
            fut = slot.payload
            if isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_result(slot.engine)

    def poll(self, model: str | None = None) -> None:
        """Start what can start now (an engine joined or came back, a window opened)."""
        now = time.perf_counter()
        for m in [model] if model else self.core.models:
            self._wake(self.core.poll(m, now))
            self._arm_timer(m)

    def _arm_timer(self, model: str) -> None:
        when = self.core.wake_at(model, time.perf_counter())
        old = self._timers.pop(model, None)
        if old is not None:
            old.cancel()
        if when is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - time.perf_counter())
            self._timers[model] = loop.call_later(delay, self.poll, model)

    def fail_waiting(self, message: str) -> int:
        """Every queued request gets a 503 with `message`; returns how many there were."""
        n = 0
        for slot in list(self.core.slots.values()):
            fut = slot.payload
            if not slot.engine and isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_exception(ApiError(503, message, code="shutting_down",
                                           headers={"Retry-After": "1"}))  # fmt: skip
                n += 1
        return n

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
