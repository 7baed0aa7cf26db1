"""Simulated engines (`kind = "sim"`) started inside the gateway's own event loop."""

from __future__ import annotations

from aiohttp import web

from engines.sim.engine import SimEngineConfig
from engines.sim.server import build_app as build_sim_app
from gateway.config.schema import Config, EngineConfig


async def start_sim(cfg: Config, e: EngineConfig) -> tuple[web.AppRunner, str]:
    """Start the simulated engine `e` describes; returns its runner and its base URL."""
    sim = SimEngineConfig(
        model=e.model, arch=e.arch, gpu=e.gpu, tp=e.tp, time_scale=cfg.sim.time_scale,
        max_num_seqs=e.max_num_seqs, max_batched_tokens=e.max_batched_tokens,
        seed=cfg.sim.seed, engine_id=e.id, api_key=e.api_key,
    )  # fmt: skip
    runner = web.AppRunner(build_sim_app(sim), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.sim.host, e.port, backlog=cfg.server.backlog)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return runner, f"http://{cfg.sim.host}:{port}"
