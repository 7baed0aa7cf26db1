"""Active health checks and load scraping of engines over vLLM's HTTP surface."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import aiohttp

from gateway.fleet.registry import EngineRegistry, EngineState

GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",  # the name before vLLM 0.10
}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """Sum each load gauge over its label sets (one set per engine core with data parallel)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, rest = line[:space], line[space:]
        field = GAUGES.get(name)
        if field is None:
            continue
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if math.isfinite(value):
            out[field] = out.get(field, 0.0) + value
    return out


EventHook = Callable[[EngineState, str], None]
# The gateway's own requests in flight at an engine (by id) now: the ledger's count.
InFlight = Callable[[str], int]


async def probe(
    registry: EngineRegistry,
    engine: EngineState,
    session: aiohttp.ClientSession,
    probe_timeout: float,
    on_change: EventHook,
    in_flight: InFlight | None = None,
) -> None:
    """One probe: `GET /health`, then the load gauges from `GET /metrics`, with the
    gateway's own in-flight count there (`in_flight`) when the engine answered: that many of
    the scraped running + waiting requests are the gateway's."""
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    to = aiohttp.ClientTimeout(total=probe_timeout)
    try:
        async with session.get(f"{engine.url}/health", timeout=to, headers=headers) as resp:
            ok = resp.status == 200
        if ok:
            async with session.get(f"{engine.url}/metrics", timeout=to, headers=headers) as resp:
                if resp.status == 200:
                    mine = in_flight(engine.id) if in_flight is not None else 0
                    gauges = parse_vllm_metrics(await resp.text())
                    engine.running = int(gauges.get("running", engine.running))
                    engine.waiting = int(gauges.get("waiting", engine.waiting))
                    engine.kv_usage = gauges.get("kv_usage", engine.kv_usage)
                    if "running" in gauges or "waiting" in gauges:
                        engine.in_flight_at_scrape = mine
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        ok = False
    if ok:
        if registry.probe_ok(engine):
            on_change(engine, "readmitted")
    elif registry.probe_failed(engine):
        on_change(engine, "ejected")


async def health_loop(
    registry: EngineRegistry,
    session: aiohttp.ClientSession,
    interval: float,
    probe_timeout: float,
    on_change: EventHook,
    in_flight: InFlight | None = None,
) -> None:
    """Probe every engine every `interval` seconds until cancelled; `in_flight` gives the
    gateway's own requests open at an engine, recorded with its gauges."""
    while True:
        await asyncio.gather(
            *(
                probe(registry, e, session, probe_timeout, on_change, in_flight)
                for e in registry.engines.values()
            )
        )
        await asyncio.sleep(interval)
