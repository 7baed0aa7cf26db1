"""The gateway's aiohttp application: endpoints, error middleware and resource lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import generate_latest

from engines.perf_model import GPUS, MODELS
from engines.protocol import json_response
from engines.sim.engine import SimEngineConfig
from engines.sim.server import build_app as build_sim_app
from gateway.config.schema import Config, EngineConfig
from gateway.core.errors import ApiError
from gateway.core.request import Endpoint, RequestInfo
from gateway.fleet.health import health_loop
from gateway.fleet.registry import EngineRegistry, EngineState
from gateway.http.admin import tenants_view
from gateway.http.auth import KeyRing
from gateway.http.errors import openai_errors
from gateway.http.gate import Gate
from gateway.http.request import INTERACTION_HEADER, measure, parse_body
from gateway.lengths.featurelog import FeatureLog
from gateway.lengths.features import Record
from gateway.lengths.predictor import LengthPredictor
from gateway.lengths.service import REGIONS_HEADER, LengthService
from gateway.obs.metrics import GatewayMetrics
from gateway.routing.latency import EngineProfile, build_policy
from gateway.state.buckets import BucketStore, MemoryStore, RedisStore
from gateway.upstream.client import UpstreamPool
from gateway.upstream.proxy import Outcome, Proxy

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_ids() -> Iterator[str]:
    """A random per-process prefix and a counter: unique across gateway replicas without a
    random draw per request."""
    prefix = os.urandom(6).hex()
    return (f"{prefix}-{n:x}" for n in itertools.count(1))


@dataclass(slots=True)
class Gateway:
    """Everything one gateway process holds, built once at start-up."""

    cfg: Config
    keys: KeyRing
    metrics: GatewayMetrics
    registry: EngineRegistry
    proxy: Proxy
    probes: aiohttp.ClientSession  # health checks and load scraping
    gate: Gate
    ids: Iterator[str] = field(default_factory=request_ids)
    lengths: LengthService | None = None  # output-length prediction and the feature log


GATEWAY = web.AppKey("gateway", Gateway)
log = structlog.get_logger("fairway")


async def _proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    arrival = time.perf_counter()
    given = request.headers.get("X-Request-Id", "")
    rid = given if given and _REQUEST_ID.match(given) else next(gw.ids)
    out = Outcome()
    tenant = app = model = "-"
    predicted: tuple[RequestInfo, Record] | None = None
    try:
        principal = gw.keys.authenticate(request.headers.get("Authorization"))
        tenant, app = principal.tenant, principal.app
        try:
            if request.content.is_eof():  # the usual case: the body came with the headers
                raw = await request.read()
            else:
                async with asyncio.timeout(gw.cfg.server.body_timeout_s):
                    raw = await request.read()
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body did not arrive within {gw.cfg.server.body_timeout_s:g} s.",
                code="request_timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413,
                f"Request body is larger than the limit of {gw.cfg.server.max_body_bytes} bytes.",
                code="request_too_large",
            ) from None
        body = parse_body(raw, endpoint)
        model = body["model"]
        if model not in gw.registry.by_model:
            raise ApiError(
                404,
                f"The model '{model}' does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        info = measure(body, endpoint, principal, rid, request.headers.get(INTERACTION_HEADER),
                       arrival)  # fmt: skip
        if gw.lengths is not None:
            predicted = gw.lengths.annotate(info, body, request.headers.get(REGIONS_HEADER))
            info = predicted[0]
        admitted = await gw.gate.enter(info)
        out.headers = admitted.headers
        out.on_events = lambda n: gw.gate.on_tokens(admitted, n)
        try:
            return await gw.proxy.forward(request, info, body, out, admitted.engine)
        finally:
            usage = out.usage
            await gw.gate.leave(admitted, usage.prompt_tokens, usage.completion_tokens)
    except ApiError as exc:
        out.status = exc.status
        if out.headers:
            exc.headers = {**out.headers, **(exc.headers or {})}
        if out.engine == "-":
            gw.metrics.rejected.labels(tenant, str(exc.status)).inc()
        raise
    except asyncio.CancelledError:
        out.status = 499
        raise
    finally:
        _account(gw, rid, tenant, app, model, out, arrival)
        if predicted is not None and gw.lengths is not None:
            done = out.status == 200 and out.usage.completion_tokens is not None
            gw.lengths.finish(*predicted, out.usage.completion_tokens if done else None,
                              engine=out.engine, ttft=out.ttft,
                              latency=time.perf_counter() - arrival)  # fmt: skip


def _account(
    gw: Gateway, rid: str, tenant: str, app: str, model: str, out: Outcome, arrival: float
) -> None:
    latency = time.perf_counter() - arrival
    if out.engine != "-":
        m = gw.metrics.of(tenant, model, out.engine)
        m.status(out.status).inc()
        m.latency.observe(latency)
        if out.ttft is not None:
            m.ttft.observe(out.ttft)
        if out.usage.prompt_tokens:
            m.prompt_tokens.inc(out.usage.prompt_tokens)
        completion = out.usage.completion_tokens
        if completion is None and out.events:
            completion = out.events  # engines that send no usage: about a token per event
        if completion:
            m.completion_tokens.inc(completion)
    log.info(
        "request",
        request_id=rid,
        tenant=tenant,
        app=app,
        model=model,
        engine=out.engine,
        status=out.status,
        attempts=out.attempts,
        prompt_tokens=out.usage.prompt_tokens,
        completion_tokens=out.usage.completion_tokens,
        ttft_ms=None if out.ttft is None else round(out.ttft * 1000, 3),
        latency_ms=round(latency * 1000, 3),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.COMPLETIONS)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"))
    cards = [
        {"id": m, "object": "model", "created": 0, "owned_by": "fairway"}
        for m in gw.registry.models
    ]
    return json_response({"object": "list", "data": cards})


async def healthz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    models = {m: sum(e.healthy for e in engines) for m, engines in gw.registry.by_model.items()}
    ok = any(models.values())
    return json_response(
        {"status": "ok" if ok else "no healthy engine", "healthy_engines": models},
        status=200 if ok else 503,
    )


async def admin_tenants(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.keys.authenticate_admin(request.headers.get("Authorization"))
    return json_response(await tenants_view(gw.gate))


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    for model, policy in gw.gate.dispatcher.policies.items():
        counters = policy.counters()
        for tenant in gw.cfg.tenants:
            gw.metrics.queue_depth.labels(tenant, model).set(policy.backlog(tenant))
            gw.metrics.service.labels(tenant, model).set(counters.get(tenant, 0.0))
    for e in gw.registry.engines.values():
        gw.metrics.in_flight.labels(e.model, e.id, e.region).set(e.in_flight)
        gw.metrics.engine_healthy.labels(e.model, e.id, e.region).set(int(e.healthy))
    body = generate_latest(gw.metrics.registry)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


async def _start_sim(cfg: Config, e: EngineConfig) -> tuple[web.AppRunner, str]:
    sim = SimEngineConfig(
        model=e.model, arch=e.arch, gpu=e.gpu, tp=e.tp, time_scale=cfg.sim.time_scale,
        max_num_seqs=e.max_num_seqs, max_batched_tokens=e.max_batched_tokens,
        seed=cfg.sim.seed, engine_id=e.id, api_key=e.api_key,
    )  # fmt: skip
    runner = web.AppRunner(build_sim_app(sim), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.sim.host, e.port, backlog=cfg.server.backlog)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://{cfg.sim.host}:{port}"


def engine_profiles(engines: list[EngineConfig]) -> dict[str, EngineProfile]:
    """Perf-model profiles for the router, for engines whose gpu and arch are known presets."""
    return {
        e.id: EngineProfile.named(e.gpu, e.arch, e.tp, e.max_num_seqs, e.max_batched_tokens)
        for e in engines
        if e.gpu in GPUS and e.arch in MODELS
    }


def build_app(cfg: Config) -> web.Application:
    """The gateway application for `cfg`; sim engines start with it, inside its event loop."""
    app = web.Application(client_max_size=cfg.server.max_body_bytes, middlewares=[openai_errors])

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        runners: list[web.AppRunner] = []
        engines: list[EngineConfig] = []
        try:
            for e in cfg.engines:
                if e.kind == "sim":
                    runner, url = await _start_sim(cfg, e)
                    runners.append(runner)
                    e = replace(e, url=url)
                engines.append(e)
            registry = EngineRegistry(
                (EngineState(e.id, e.region, e.model, e.url, e.api_key) for e in engines),
                unhealthy_after=cfg.server.unhealthy_after,
                healthy_after=cfg.server.healthy_after,
            )
            # Requests go through the lean pool; probes, rare and tiny, through aiohttp.
            pool = UpstreamPool(cfg.server.connect_timeout_s, cfg.server.read_timeout_s)
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            metrics = GatewayMetrics()
            rc = cfg.routing
            policy = build_policy(rc.policy, engine_profiles(engines), rc.region_threshold)
            proxy = Proxy(registry, policy, pool, metrics, cfg.server)
            flog = None
            if rc.feature_log_dir:
                flog = FeatureLog(rc.feature_log_dir, rc.feature_log_max_bytes, rc.feature_log_keep)
            lengths = LengthService(LengthPredictor(rc.model_path or None), flog,
                                    rc.preferred_regions)  # fmt: skip
            store: BucketStore = (
                RedisStore(cfg.state.redis_url, cfg.state.prefix)
                if cfg.state.backend == "redis"
                else MemoryStore()
            )
            gate = Gate(cfg, registry, policy, store, metrics)
            keys = KeyRing(cfg.tenants, cfg.admin.key_digests)
            gw = Gateway(cfg, keys, metrics, registry, proxy, session, gate, lengths=lengths)
            app[GATEWAY] = gw
            reload = asyncio.get_running_loop().create_task(lengths.watch(rc.reload_interval_s))

            def on_change(engine: EngineState, event: str) -> None:
                if engine.healthy:
                    gate.poll(engine.model)
                metrics.engine_healthy.labels(engine.model, engine.id, engine.region).set(
                    int(engine.healthy)
                )
                log.warning("engine_" + event, engine=engine.id, url=engine.url)

            probes = health_loop(
                registry, session, cfg.server.health_interval_s, cfg.server.health_timeout_s,
                on_change,
            )  # fmt: skip
            health = asyncio.get_running_loop().create_task(probes)
            log.info("started", engines=len(engines), models=registry.models)
            yield
            for task in (health, reload):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            lengths.close()
            gate.close()
            await store.close()
            await session.close()
            await pool.close()
        finally:
            for runner in runners:
                await runner.cleanup()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/tenants", admin_tenants)
    return app
