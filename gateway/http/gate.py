"""The gate in front of the proxy: throttle (OIT), then wait for a slot in the fairness queue.

The thin asyncio layer around `gateway.core.admission` and `gateway.core.dispatch`: a waiting
request is a future that the dispatcher resolves with an engine id when the policy picks it. A
client that goes away while waiting leaves the queue at once (aiohttp cancels its handler);
nothing waits longer than `fairness.queue_timeout_s`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from gateway.config.schema import Config
from gateway.core.admission import Admission, Keyed, Verdict, ratelimit_headers
from gateway.core.dispatch import Decision, build_dispatcher
from gateway.core.errors import ApiError
from gateway.core.fairness import Ticket
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import RequestInfo
from gateway.fleet.registry import EngineRegistry
from gateway.obs.metrics import GatewayMetrics
from gateway.routing.policies import RoutingPolicy
from gateway.state.buckets import BucketStore


@dataclass(slots=True, eq=False)
class Pass:
    """A request let through the gate: where it goes and what to settle when it ends."""

    info: RequestInfo
    ticket: Ticket
    engine: str
    keys: Keyed
    cost: float
    headers: dict[str, str] = field(default_factory=dict)
    charged_output: int = 0
    done: bool = False
    future: asyncio.Future[str] | None = None  # resolved with an engine id when picked


class Gate:
    def __init__(
        self,
        cfg: Config,
        registry: EngineRegistry,
        router: RoutingPolicy,
        store: BucketStore,
        metrics: GatewayMetrics,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.router = router
        self.dispatcher = build_dispatcher(cfg, registry.snapshots, self._route)
        self.admission = Admission(cfg, self.dispatcher)
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def _route(self, t: Ticket, engines: list[EngineSnapshot]) -> str:
        p: Pass = t.payload
        return self.router.choose(p.info, engines)

    async def enter(self, info: RequestInfo) -> Pass:
        """Admit `info` and wait for its slot; raises ApiError 429 or 503 when it may not go."""
        now = time.monotonic()
        a = self.admission.prepare(info, now)
        keys, cost = a.keys, a.cost
        verdict = await self.store.admit(keys, cost, a.need, a.enforce)
        headers = ratelimit_headers(verdict)
        if not verdict.admitted:
            self.metrics.throttled.labels(info.tenant, info.app).inc()
            raise self._throttled(info, verdict, headers)
        ticket = a.ticket
        p = Pass(info, ticket, "", keys, cost, headers)
        ticket.payload = p
        decision, engine = self.dispatcher.submit(ticket, info.model, now)
        if decision in (Decision.START, Decision.QUEUED):
            self.admission.admitted(info, now)
        if decision is Decision.START:
            p.engine = engine
            return p
        if decision is Decision.UNAVAILABLE:
            await self.store.settle(keys, -cost)
            raise ApiError(
                503,
                f"No healthy engine can serve model '{info.model}' right now; retry shortly.",
                code="no_healthy_engine",
                headers={**headers, "Retry-After": str(self.cfg.server.retry_after_s)},
            )
        if decision is Decision.FULL:
            await self.store.settle(keys, -cost)
            self.metrics.dropped.labels(info.tenant, "queue_full").inc()
            raise ApiError(
                429,
                f"Tenant '{info.tenant}' already has {self.cfg.fairness.max_queue_per_tenant} "
                f"requests waiting for model '{info.model}'; retry later.",
                code="queue_full",
                headers={**headers, "Retry-After": str(self.cfg.server.retry_after_s)},
            )
        self._arm_timer(info.model)
        return await self._wait(p)

    async def _wait(self, p: Pass) -> Pass:
        p.future = fut = asyncio.get_running_loop().create_future()
        model, timeout = p.info.model, self.cfg.fairness.queue_timeout_s
        try:
            async with asyncio.timeout(timeout):
                p.engine = await fut
            return p
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not self.dispatcher.cancel(p.ticket, model):
                # Picked in the same instant: give the slot back to the next in line.
                await self.leave(p, None, None)
            else:
                await self.store.settle(p.keys, -p.cost)
            reason = "client_gone" if isinstance(exc, asyncio.CancelledError) else "timeout"
            self.metrics.dropped.labels(p.info.tenant, reason).inc()
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = (
                "stayed saturated"
                if self.dispatcher.snapshots(model)
                else "was ejected (no healthy engine came back)"
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
        p.charged_output += n
        self.dispatcher.on_tokens(p.ticket, p.info.model, n)

    async def leave(self, p: Pass, prompt_tokens: int | None, output_tokens: int | None) -> None:
        """The request ended: settle counters and buckets with real usage, free its slot."""
        if p.done:
            return
        p.done = True
        output = p.charged_output if output_tokens is None else output_tokens
        if output != p.charged_output:
            self.on_tokens(p, output - p.charged_output)
        prompt = prompt_tokens or p.info.prompt_tokens
        now = time.monotonic()
        started = self.dispatcher.finish(p.ticket, p.info.model, prompt, output, now)
        self._wake(started)
        real = prompt + output
        if real != p.cost:
            await self.store.settle(p.keys, real - p.cost)

    def _wake(self, started: list[tuple[Ticket, str]]) -> None:
        for t, engine in started:
            fut = t.payload.future
            if fut is not None and not fut.done():
                fut.set_result(engine)

    def poll(self, model: str | None = None) -> None:
        """Start what can start now (an engine came back, a rate-limit window opened)."""
        now = time.monotonic()
        for m in [model] if model else list(self.dispatcher.policies):
            self._wake(self.dispatcher.poll(m, now))
            self._arm_timer(m)

    def _arm_timer(self, model: str) -> None:
        when = self.dispatcher.policy(model).wake_at(time.monotonic())
        old = self._timers.pop(model, None)
        if old is not None:
            old.cancel()
        if when is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, when - time.monotonic())
            self._timers[model] = loop.call_later(delay, self.poll, model)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
