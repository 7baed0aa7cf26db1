"""Active health checks and load scraping of engines over vLLM's HTTP surface."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

import aiohttp
import structlog

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


log = structlog.get_logger("fairway.health")

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
    alive_within: float = 0.0,
) -> None:
    """One probe: `GET /health`, then the load gauges from `GET /metrics`, with the
    gateway's own in-flight count there (`in_flight`) when the engine answered: that many of
    the scraped running + waiting requests are the gateway's. Whatever goes wrong in it
    counts as a failed probe, except a time-out at an engine that answered a request in full
    within the last `alive_within` seconds."""
    try:
        ok = await _check(engine, session, probe_timeout, in_flight)
    except TimeoutError:
        # Slow, not dead, when it finished a request since the last round: under load an
        # engine's /health waits behind its work, and ejecting every busy engine at once
        # would turn overload into an outage. A hung engine finishes nothing and is ejected.
        if engine.healthy and time.monotonic() - engine.completed_at < alive_within:
            log.info("engine_probe_slow", engine=engine.id, timeout_s=probe_timeout)
            return
        ok = False
    except (aiohttp.ClientError, UnicodeDecodeError):
        ok = False
    except Exception as exc:  # a bad header, a parser bug: a failed probe, never more
        log.warning("engine_probe_error", engine=engine.id, error=repr(exc))
        ok = False
    if ok:
        if registry.probe_ok(engine):
            on_change(engine, "readmitted")
    elif registry.probe_failed(engine):
        on_change(engine, "ejected")


async def _check(
    engine: EngineState,
    session: aiohttp.ClientSession,
    probe_timeout: float,
    in_flight: InFlight | None,
) -> bool:
    headers = {"Authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}
    to = aiohttp.ClientTimeout(total=probe_timeout)
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
    return ok


def jittered(interval: float) -> float:
    """`interval` give or take 20%, so that gateways do not probe engines in lock step."""
    return interval * random.uniform(0.8, 1.2)


async def health_loop(
    registry: EngineRegistry,
    session: aiohttp.ClientSession,
    interval: float,
    probe_timeout: float,
    on_change: EventHook,
    in_flight: InFlight | None = None,
) -> None:
    """Probe every engine about every `interval` seconds (jittered) until cancelled;
    `in_flight` gives the gateway's own requests open at an engine, recorded with its gauges.
    A probe that fails in any way fails alone: the loop goes on."""
    alive_within = interval * 1.2 + probe_timeout  # since the round before this one
    while True:
        results = await asyncio.gather(
            *(
                probe(registry, e, session, probe_timeout, on_change, in_flight, alive_within)
                for e in list(registry.engines.values())
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, Exception):  # from `on_change`: logged, the loop goes on
                log.error("health_round_error", error=repr(r))
        await asyncio.sleep(jittered(interval))
