"""The gateway's fairness policies on the cluster simulator (gateway.simulate.GateFrontend)."""

from __future__ import annotations

import random

from engines.cluster import ClusterSim, EngineSpec, Job
from gateway.config.schema import parse
from gateway.routing.policies import LeastOutstanding
from gateway.simulate import GateFrontend, request_info
from loadtest.metrics import Record, fairness

MODEL = "llama-3.1-8b"


def run(policy: str, rates: dict[str, float], duration: float = 60.0, **tenant: float) -> list[Job]:
    cfg = parse({
        "tenants": {t: {"weight": 1.0, **tenant} for t in rates},
        "fairness": {"policy": policy, "rpm_limit": 240, "overload_at": 0.9},
        "engines": {"r": {MODEL: [{"kind": "sim", "gpu": "A100", "max_running": 16}]}},
    })  # fmt: skip
    front = GateFrontend(cfg, LeastOutstanding(), oit=bool(tenant))
    e = cfg.engines[0]
    sim = ClusterSim([EngineSpec(e.id, e.region, e.model, e.arch, e.gpu)], front)
    front.sim = sim
    rng = random.Random(7)
    arrivals = []
    for tenant_name, rate in rates.items():
        t = 0.0
        while (t := t + rng.expovariate(rate)) < duration:
            arrivals.append((t, tenant_name))
    jobs = [
        Job(f"j{i}", t, MODEL, 256, 128,
            request_info(f"j{i}", name, "default", MODEL, 256, t))
        for i, (t, name) in enumerate(sorted(arrivals))
    ]  # fmt: skip
    sim.run(jobs, until=duration * 4)
    return jobs


def max_diff(jobs: list[Job], duration: float = 60.0) -> float:
    records = [
        Record(j.info.tenant, j.arrival, j.first_token, j.finished, j.prompt_tokens, j.generated,
               1.0, j.rejected or "ok")
        for j in jobs
    ]  # fmt: skip
    return fairness(records, 0.0, duration, 10.0).max_diff


def test_vtc_and_wsc_split_an_overloaded_engine_evenly_fcfs_does_not() -> None:
    rates = {"light": 6.0, "heavy": 24.0}  # the engine finishes about 16 of these a second
    fcfs, vtc, wsc = (max_diff(run(p, rates)) for p in ("fcfs", "vtc", "wsc"))
    assert vtc < fcfs / 4 and wsc < fcfs / 4, (fcfs, vtc, wsc)


def test_rpm_caps_a_tenant_and_oit_throttles_the_flood_only() -> None:
    jobs = run("rpm", {"a": 10.0})
    started = [j for j in jobs if j.started is not None and j.started < 60]
    assert len(started) <= 240 + 16  # rpm_limit per minute (plus the first minute's window)
    jobs = run("wsc", {"light": 2.0, "heavy": 40.0}, tokens_per_minute=60000.0)
    refused = {t: sum(j.rejected == "throttled" for j in jobs if j.info.tenant == t)
               for t in ("light", "heavy")}  # fmt: skip
    assert refused["light"] == 0 and refused["heavy"] > 100, refused
