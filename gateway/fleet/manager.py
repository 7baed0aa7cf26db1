"""Engines join, drain and leave while the gateway serves.

One place changes the fleet, so that every part that knows engines follows: the registry (and
with it `/v1/models`, `/healthz` and the health loop, which read it), the ledger's limits, the
router's performance profiles, the upstream pool's idle connections, the metrics' label sets
and, for `kind = "sim"`, the simulated engine's own server.

A draining engine takes no new requests and leaves when its last request ends; if some are
still running at the deadline, they are ended (streams get an error event and `[DONE]`) and
the engine leaves then.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from engines.perf_model import GPUS, MODELS
from gateway.config.schema import Config, EngineConfig
from gateway.core.gate import GateCore
from gateway.core.ledger import EngineLimit
from gateway.fleet.registry import EngineMode, EngineRegistry, EngineState
from gateway.fleet.sims import start_sim
from gateway.obs.metrics import GatewayMetrics
from gateway.routing.latency import EngineProfile, PredictedLatency
from gateway.upstream.client import UpstreamPool
from gateway.upstream.proxy import Proxy

log = structlog.get_logger("fairway.fleet")


def engine_profile(e: EngineConfig) -> EngineProfile | None:
    """The router's perf-model profile of `e`, when its gpu and arch are known presets."""
    if e.gpu in GPUS and e.arch in MODELS:
        return EngineProfile.named(e.gpu, e.arch, e.tp, e.max_num_seqs, e.max_batched_tokens)
    return None


@dataclass(slots=True)
class _Member:
    config: EngineConfig
    runner: web.AppRunner | None = None  # kind = "sim": its in-process server
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: asyncio.TimerHandle | None = None


class FleetManager:
    def __init__(
        self,
        cfg: Callable[[], Config],
        registry: EngineRegistry,
        core: GateCore,
        poll: Callable[[str], None],
        proxy: Proxy,
        pool: UpstreamPool,
        metrics: GatewayMetrics,
    ) -> None:
        self._cfg = cfg
        self.registry = registry
        self.core = core
        self.poll = poll  # start what waits for the model, now that the fleet changed
        self.proxy = proxy
        self.pool = pool
        self.metrics = metrics
        self.members: dict[str, _Member] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        core.on_release = self._released

    def config_of(self, engine_id: str) -> EngineConfig | None:
        m = self.members.get(engine_id)
        return None if m is None else m.config

    async def add(self, e: EngineConfig) -> EngineState:
        """Start (for sims) and admit engine `e`; it takes requests at once."""
        if e.id in self.registry.engines:
            raise ValueError(f"engine {e.id!r} is already in the fleet")
        member = _Member(e)
        url = e.url
        if e.kind == "sim":
            member.runner, url = await start_sim(self._cfg(), e)
        state = EngineState(id=e.id, region=e.region, model=e.model, url=url, kind=e.kind,
                            api_key=e.api_key)  # fmt: skip
        self.members[e.id] = member
        self.registry.add(state)
        self.core.set_limit(e.id, EngineLimit(max_running=e.max_running,
                                                   max_tokens=e.max_kv_tokens))  # fmt: skip
        self._set_profile(e.id, engine_profile(e))
        self.metrics.engine_healthy.labels(e.model, e.id, e.region).set(1)
        log.info("engine_added", engine=e.id, url=url, kind=e.kind)
        self.poll(e.model)
        return state

    def update(self, e: EngineConfig) -> None:
        """New limits or profile for an engine whose address is unchanged."""
        member = self.members[e.id]
        member.config = e
        self.core.set_limit(e.id, EngineLimit(max_running=e.max_running,
                                                   max_tokens=e.max_kv_tokens))  # fmt: skip
        self._set_profile(e.id, engine_profile(e))
        self.poll(e.model)

    def drain(self, engine_id: str, deadline_s: float) -> EngineState:
        """Take no new requests at `engine_id`; it leaves when its last request ends, or at
        the deadline, ending what still runs there. KeyError if unknown."""
        state = self.registry.engines[engine_id]
        member = self.members[engine_id]
        if state.mode is not EngineMode.DRAINING:
            state.mode = EngineMode.DRAINING
            log.info("engine_draining", engine=engine_id, in_flight=self._in_flight(engine_id),
                     deadline_s=deadline_s)  # fmt: skip
            loop = asyncio.get_running_loop()
            member.deadline = loop.call_later(deadline_s, self._deadline, engine_id)
        if not self._in_flight(engine_id):
            self.spawn(self._remove(engine_id))
        return state

    async def remove(self, engine_id: str, deadline_s: float) -> None:
        """Drain `engine_id` and wait until it has left."""
        member = self.members[engine_id]
        self.drain(engine_id, deadline_s)
        await member.gone.wait()

    def _in_flight(self, engine_id: str) -> int:
        return self.core.ledger.in_flight(engine_id)

    def _released(self, engine_id: str) -> None:
        state = self.registry.engines.get(engine_id)
        draining = state is not None and state.mode is EngineMode.DRAINING
        if draining and not self._in_flight(engine_id):
            self.spawn(self._remove(engine_id))

    def _deadline(self, engine_id: str) -> None:
        why = f"Engine {engine_id} left the fleet (drained) before this response ended."
        n = self.proxy.abort_engine(engine_id, why)
        log.warning("engine_drain_deadline", engine=engine_id, ended=n)
        self.spawn(self._remove(engine_id))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, kept until done and cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove(self, engine_id: str) -> None:
        member = self.members.pop(engine_id, None)
        state = self.registry.remove(engine_id)
        if member is None or state is None:
            return
        if member.deadline is not None:
            member.deadline.cancel()
        self.core.drop_engine(engine_id)
        self._set_profile(engine_id, None)
        self.pool.forget(state.url)
        self.proxy.live.pop(engine_id, None)
        for gauge in (self.metrics.engine_healthy, self.metrics.in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(state.model, state.id, state.region)
        if member.runner is not None:
            await member.runner.cleanup()
        log.info("engine_removed", engine=engine_id)
        member.gone.set()

    def _set_profile(self, engine_id: str, profile: EngineProfile | None) -> None:
        router = self.core.router
        if isinstance(router, PredictedLatency):
            router.set_profile(engine_id, profile)

    async def close(self) -> None:
        """Stop every in-process engine (the gateway is shutting down)."""
        for task in list(self._tasks):
            task.cancel()
        for member in self.members.values():
            if member.deadline is not None:
                member.deadline.cancel()
            if member.runner is not None:
                await member.runner.cleanup()
        self.members.clear()
