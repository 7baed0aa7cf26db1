"""The gate in front of the proxy: throttle (OIT), then wait for a slot in the fairness queue.

The thin asyncio shell around `gateway.core.gate.GateCore`: it charges the token buckets and
the hard limits (an async store, in memory or Redis), and gives back what a request took
however it ends (refused past the buckets, cancelled, timed out, failed, or done: then settled
with its real usage); a waiting request is a future that the core's
dispatcher resolves when the policy picks it. A client that goes away while waiting leaves
the queue at once (aiohttp cancels its handler); nothing waits longer than
`fairness.queue_timeout_s`, but a batch request, which waits until its deadline and is then
answered 408 `batch_deadline_exceeded` (a timer wakes the core for each deadline).
"""

from __future__ import annotations

import asyncio
import math
import time

from gateway.config.schema import Config
from gateway.core.admission import CONCURRENT, Keyed, Limit, Verdict, ratelimit_headers
from gateway.core.dispatch import Decision, Dispatcher
from gateway.core.errors import ApiError
from gateway.core.gate import Fleet, GateCore, Router, Slot
from gateway.core.request import RequestInfo
from gateway.http.batch import DEADLINE_HEADER
from gateway.obs.metrics import GatewayMetrics
from gateway.state.buckets import BucketStore


def _ms(seconds: float) -> str:
    # OpenAI's precise companion of Retry-After: clients that honour it retry just in time.
    return str(max(1, math.ceil(seconds * 1000)))


class Pass:
    """A request let through the gate: its slot in the core, the rate-limit headers its
    response carries, and every bucket it was charged to (soft and hard)."""

    __slots__ = ("headers", "keys", "slot")

    def __init__(self, slot: Slot, headers: dict[str, str], keys: Keyed = ()) -> None:
        self.slot = slot
        self.headers = headers
        self.keys = keys or slot.keys

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
        keys = [*a.keys, *a.limits] if a.limits else a.keys
        verdict = await self.store.admit(keys, a.cost, a.need, a.enforce)
        headers = ratelimit_headers(verdict)
        if not verdict.admitted:
            self.metrics.throttled.labels(info.tenant, info.app).inc()
            raise self._throttled(info, verdict, headers)
        decision, slot = core.submit(info, a, time.perf_counter())
        p = Pass(slot, headers, keys)
        if decision is Decision.START:
            return p
        if decision is Decision.UNAVAILABLE:
            await self._refund(p)
            raise ApiError(
                503,
                f"No healthy engine can serve model '{info.model}' right now; retry shortly.",
                code="no_healthy_engine",
                headers={**headers, "Retry-After": str(cfg.server.retry_after_s)},
            )
        if decision is Decision.FULL:
            await self._refund(p)
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
        batch = slot.info.klass == "batch"
        if batch:  # `poll` ends the wait at the deadline; this is only a backstop
            timeout = max(0.0, self.core.deadline(slot.info) - time.perf_counter()) + 1.0
        try:
            async with asyncio.timeout(timeout):
                await fut
            return p
        except ApiError:  # the gateway is stopping (`fail_waiting`), or the deadline passed
            await self._give_back(p)
            raise
        except (TimeoutError, asyncio.CancelledError) as exc:
            await self._give_back(p)
            if batch and isinstance(exc, TimeoutError):
                raise self._expired(slot) from None
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

    async def _give_back(self, p: Pass) -> None:
        """A waiting request leaves: what it was charged goes back if it never reached an
        engine (it was still waiting, or the core took it out); else it was picked in the
        same instant, and ends there, freeing its slot for the next in line."""
        slot = p.slot
        if self.core.cancel(slot) or (slot.done and not slot.engine):
            await self._refund(p)
        else:
            await self.leave(p, None, None)

    def _expired(self, slot: Slot) -> ApiError:
        info = slot.info
        self.metrics.batch_expired.labels(info.model).inc()
        waited = time.perf_counter() - info.arrival
        return ApiError(
            408,
            f"The deadline of this batch request passed after {waited:.1f} s in the batch "
            f"queue of model '{info.model}': no region had room for it in time. Send it again "
            f"with a later {DEADLINE_HEADER}.",
            code="batch_deadline_exceeded",
        )

    async def _refund(self, p: Pass) -> None:
        """The request never reached an engine: everything it was charged goes back."""
        await self.store.settle(p.keys, -p.slot.cost, requests=-1.0, slots=-1.0)

    def _throttled(self, info: RequestInfo, v: Verdict, headers: dict[str, str]) -> ApiError:
        if v.refused is not None and v.refused.hard:
            return self._over_limit(info, v, v.refused, headers)
        wait = max(1, math.ceil(v.retry_after_s))
        return ApiError(
            429,
            f"Rate limit reached for tenant '{info.tenant}' (application '{info.app}') while "
            f"model '{info.model}' is overloaded: limit {headers.get('x-ratelimit-limit-tokens')}"
            f" tokens per minute, remaining {headers.get('x-ratelimit-remaining-tokens')}. "
            f"Retry after {wait} s.",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(wait), "retry-after-ms": _ms(v.retry_after_s)},
        )

    def _over_limit(
        self, info: RequestInfo, v: Verdict, lim: Limit, headers: dict[str, str]
    ) -> ApiError:
        who = f"tenant '{info.tenant}'"
        if ".apps." in lim.setting:
            who += f" (application '{info.app}')"
        if lim.unit == CONCURRENT:
            retry = str(self.cfg.server.retry_after_s)
            return ApiError(
                429,
                f"Concurrency limit reached for {who}: {round(lim.burst)} requests under way at "
                f"once ({lim.setting}); retry when one has finished.",
                code="concurrency_limit",
                headers={**headers, "Retry-After": retry},
            )
        wait = max(1, math.ceil(v.retry_after_s))
        return ApiError(
            429,
            f"Rate limit reached for {who} on {lim.unit} per minute ({lim.setting}): limit "
            f"{round(lim.per_minute)}, burst {round(lim.burst)}. Please try again in {wait}s.",
            code="rate_limit_exceeded",
            headers={**headers, "Retry-After": str(wait), "retry-after-ms": _ms(v.retry_after_s)},
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
        if delta or p.keys is not slot.keys:
            await self.store.settle(p.keys, delta, slots=-1.0)

    def _wake(self, started: list[Slot]) -> None:
        for slot in started:
            fut = slot.payload
            if isinstance(fut, asyncio.Future) and not fut.done():
                fut.set_result(slot.engine)

    def poll(self, model: str | None = None) -> None:
        """Start what can start now (an engine joined or came back, a window opened, a batch
        deadline came near), and answer the batch requests whose deadline passed."""
        now = time.perf_counter()
        for m in [model] if model else self.core.models:
            for slot in self.core.expire(m, now):
                fut = slot.payload
                if isinstance(fut, asyncio.Future) and not fut.done():
                    fut.set_exception(self._expired(slot))
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
