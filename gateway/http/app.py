"""The gateway's aiohttp application: its routes and the lifecycle of what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog
from aiohttp import web

from gateway.config.schema import Config
from gateway.fleet.health import health_loop
from gateway.fleet.manager import FleetManager
from gateway.fleet.registry import EngineRegistry, EngineState
from gateway.http import admin, openapi
from gateway.http.auth import KeyRing
from gateway.http.errors import openai_errors
from gateway.http.gate import Gate
from gateway.http.handlers import chat_completions, completions, healthz, list_models, metrics
from gateway.http.reload import reload_config
from gateway.http.state import GATEWAY, Gateway
from gateway.lengths.featurelog import FeatureLog
from gateway.lengths.predictor import LengthPredictor
from gateway.lengths.service import LengthService
from gateway.obs.metrics import GatewayMetrics
from gateway.routing.latency import build_policy
from gateway.state.buckets import BucketStore, MemoryStore, RedisStore
from gateway.state.cluster import ClusterSync
from gateway.upstream.client import UpstreamPool
from gateway.upstream.proxy import Proxy

if TYPE_CHECKING:
    from planner.controller import Controller

log = structlog.get_logger("fairway")


def build_app(
    cfg: Config, *, config_path: str | Path | None = None, raw: dict[str, Any] | None = None
) -> web.Application:
    """The gateway application for `cfg`; sim engines start with it, inside its event loop.
    `config_path` is the file SIGHUP and `POST /admin/reload` re-read; `raw` the document
    `cfg` was parsed from (read from `config_path` when not given). Serve it with aiohttp's
    `auto_decompress=False` (`gateway.http.serve` does): the handlers decode bodies."""
    app = web.Application(client_max_size=cfg.server.max_body_bytes, middlewares=[openai_errors])
    path = Path(config_path) if config_path is not None else None
    if raw is None and path is not None:
        with path.open("rb") as f:
            raw = tomllib.load(f)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        registry = EngineRegistry(
            unhealthy_after=cfg.server.unhealthy_after, healthy_after=cfg.server.healthy_after
        )
        # Requests go through the lean pool; probes, rare and tiny, through aiohttp.
        pool = UpstreamPool(cfg.server.connect_timeout_s, cfg.server.read_timeout_s)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        metrics_ = GatewayMetrics()
        rc = cfg.routing
        router = build_policy(rc.policy, {}, rc.region_threshold)
        proxy = Proxy(registry, pool, metrics_, cfg.server)
        flog = None
        if rc.feature_log_dir:
            flog = FeatureLog(rc.feature_log_dir, rc.feature_log_max_bytes, rc.feature_log_keep)
        lengths = LengthService(LengthPredictor(rc.model_path or None), flog,
                                rc.preferred_regions)  # fmt: skip
        st = cfg.state
        store: BucketStore = MemoryStore()
        if st.backend == "redis":
            store = RedisStore(st.redis_url, st.prefix, timeout_s=st.timeout_s,
                               open_after=st.open_after, probe_interval_s=st.probe_interval_s,
                               on_change=metrics_.state_up.set)  # fmt: skip
        metrics_.state_up.set(1)
        gate = Gate(cfg, registry, router, store, metrics_)
        shared: ClusterSync | None = None
        if st.backend == "redis":
            core = gate.core
            shared = ClusterSync(
                st.redis_url, st.prefix, models=lambda: registry.models,
                policy=core.dispatcher.policy, loads=lambda: core.ledger.loads,
                engines_of=lambda m: [e.id for e in registry.engines_of(m)], poll=gate.poll,
                interval_s=st.sync_interval_s, timeout_s=st.timeout_s,
                on_replicas=metrics_.replicas.set,
            )  # fmt: skip
            core.on_demand = lambda key, minute, p, o: shared.demand.add(key, minute, 1, p, o)
        gw = Gateway(cfg, KeyRing(cfg.tenants, cfg.admin.key_digests), metrics_, registry, proxy,
                     session, gate, FleetManager(lambda: gw.cfg, registry, gate.core, gate.poll,
                                                 proxy, pool, metrics_),
                     lengths=lengths, config_path=path, raw=raw or {},
                     shared_demand=shared.demand if shared is not None else None)  # fmt: skip
        app[GATEWAY] = gw
        tasks: list[asyncio.Task[None]] = []
        hup = False
        planner: Controller | None = None
        try:
            for e in cfg.engines:
                await gw.fleet.add(e)
            tasks.append(loop.create_task(lengths.watch(rc.reload_interval_s)))

            def on_change(engine: EngineState, event: str) -> None:
                if engine.id not in registry.engines:
                    return  # left the fleet while it was probed
                if engine.healthy:
                    gate.poll(engine.model)
                metrics_.engine_healthy.labels(engine.model, engine.id, engine.region).set(
                    int(engine.healthy)
                )
                log.warning("engine_" + event, engine=engine.id, url=engine.url)

            probes = health_loop(
                registry, session, cfg.server.health_interval_s, cfg.server.health_timeout_s,
                on_change, gate.core.ledger.in_flight,
            )  # fmt: skip
            tasks.append(loop.create_task(probes))
            if shared is not None:
                tasks.append(loop.create_task(shared.run()))
            if cfg.planner.clock_speed != 1:
                from gateway.fleet.planning import fast_clock

                gate.core.clock = fast_clock(cfg.planner.clock_speed)
            if cfg.planner.enabled:
                from gateway.fleet.planning import PLANNER, build_planner

                planner = build_planner(cfg, gw.fleet, lambda: gate.core.clock(),
                                        gate.core.demand, gw.shared_demand, metrics_)  # fmt: skip
                app[PLANNER] = planner
                tasks.append(loop.create_task(planner.run()))
            if path is not None:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signal.SIGHUP, _on_sighup, gw, tasks)
                    hup = True
            log.info("started", engines=len(registry.engines), models=registry.models)
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if planner is not None:
                await planner.actuator.close()
            lengths.close()
            gate.close()
            if shared is not None:
                await shared.close()
            await store.close()
            await session.close()
            await pool.close()
            await gw.fleet.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    admin.add_routes(app.router)
    if cfg.planner.enabled:
        # Only then: the planner needs its extra (PuLP, statsmodels), the gateway does not.
        from gateway.fleet.planning import admin_planner

        app.router.add_get("/admin/planner", admin_planner)
    app.router.add_get("/openapi.json", openapi.serve)
    return app


def _on_sighup(gw: Gateway, tasks: list[asyncio.Task[None]]) -> None:
    async def run() -> None:
        await reload_config(gw)

    task = asyncio.get_running_loop().create_task(run())
    tasks.append(task)
    task.add_done_callback(lambda t: tasks.remove(t) if t in tasks else None)
