"""The routing benchmark's simulator side: the gateway's gate core in front of simulated engines.

Every run goes through `gateway.simulate.GateFrontend`, the gateway's own `GateCore` on the
cluster simulator's clock: admission (OIT over token buckets), the fairness queue, the
configured routing policy over the ledger's view of each engine and the gauges scraped every
`health_interval_s`, and the `LengthService` that predicts output lengths. The config is the
one the live replay (benchmarks/routing_live.py) runs the gateway on: the workload's tenants
and applications, each with a key, and the fleet as `[engines]` entries with the simulator's
engine ids. The router prices each engine with its performance model, as the gateway sets it
when the engine joins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import quantile
from benchmarks.routing_workload import APPS
from engines.cluster import ClusterSim, EngineSpec, Job
from gateway.config.schema import Config, parse
from gateway.core.request import Endpoint
from gateway.fleet.manager import engine_profile
from gateway.http.auth import Principal, digest
from gateway.http.request import measure
from gateway.lengths.predictor import LengthPredictor
from gateway.lengths.service import LengthService
from gateway.routing.latency import PredictedLatency, build_policy
from gateway.simulate import GateFrontend, SimRequest

MODEL = "llama-3.1-8b"


def key(tenant: str, app: str) -> str:
    """The API key of one application of the workload."""
    return f"sk-{tenant}-{app}"


def fleet(n: int, model: str = MODEL, gpu: str = "H100") -> list[EngineSpec]:
    return [EngineSpec(f"e{i}", "r0", model, arch=model, gpu=gpu) for i in range(n)]


def config_dict(
    specs: Sequence[EngineSpec],
    policy: str = "predicted-latency",
    model_path: str | Path | None = None,
    fairness: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The gateway config (as parsed TOML) for the workload on `specs`: a tenant per tenant of
    routing_workload.APPS with its applications and a key for each, one `kind = "sim"` engine
    per spec under the spec's id (with the settings in `engine` added), the routing policy and
    the length model. Everything else is the gateway's default: no token buckets (so OIT
    throttles nothing), the WSC queue, in-flight limits per engine of its `max_num_seqs`
    requests and its KV capacity in tokens, health probes (and so gauge scrapes) every 2 s."""
    tenants: dict[str, Any] = {}
    for a in APPS:
        t = tenants.setdefault(a.tenant, {"weight": 1.0, "apps": {}, "keys": []})
        t["apps"][a.name] = {}
        t["keys"].append({"sha256": digest(key(a.tenant, a.name)), "app": a.name})
    engines: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in specs:
        engines.setdefault(s.region, {}).setdefault(s.model, []).append({
            "id": s.id, "kind": "sim", "gpu": s.gpu, "arch": s.arch, "tp": s.tp,
            "max_num_seqs": s.max_num_seqs, "max_batched_tokens": s.max_batched_tokens,
            **(engine or {}),
        })  # fmt: skip
    doc: dict[str, Any] = {
        "routing": {"policy": policy, "model_path": str(model_path or "")},
        "tenants": tenants,
        "engines": engines,
    }
    if fairness:
        doc["fairness"] = dict(fairness)
    return doc


def config(
    specs: Sequence[EngineSpec],
    policy: str = "predicted-latency",
    model_path: str | Path | None = None,
    fairness: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
) -> Config:
    return parse(config_dict(specs, policy, model_path, fairness, engine))


def specs_of(cfg: Config) -> list[EngineSpec]:
    """The simulator's engines for the config's `[engines]`, same ids, same order."""
    return [
        EngineSpec(e.id, e.region, e.model, e.arch, e.gpu, e.tp, e.max_num_seqs,
                   e.max_batched_tokens)
        for e in cfg.engines
    ]  # fmt: skip


def frontend(
    cfg: Config, *, oracle: bool = False, scrape_interval: float | None = None
) -> GateFrontend:
    """The gate core as the gateway builds it for `cfg`: its routing policy (each engine's
    performance profile set as the engine joins), its length service, OIT on, and gauges
    scraped every `server.health_interval_s` (or `scrape_interval`, in simulated seconds)."""
    rc = cfg.routing
    router = build_policy(rc.policy, {}, rc.region_threshold)
    if isinstance(router, PredictedLatency):
        for e in cfg.engines:
            router.set_profile(e.id, engine_profile(e))
    lengths = LengthService(LengthPredictor(rc.model_path or None),
                            preferred_regions=rc.preferred_regions)  # fmt: skip
    interval = cfg.server.health_interval_s if scrape_interval is None else scrape_interval
    return GateFrontend(cfg, router, lengths=lengths, oit=True, scrape_interval=interval,
                        oracle=oracle)  # fmt: skip


def make_job(rid: str, t: float, tenant: str, app: str, body: dict[str, Any],
             output_tokens: int) -> Job:  # fmt: skip
    """A simulator job carrying the RequestInfo the gateway's handler would build for `body`
    (`gateway.http.request.measure`) and the body, for the length predictor's features."""
    info = measure(body, Endpoint.CHAT, Principal(tenant, app), rid, None, arrival=t)
    return Job(rid, t, body["model"], info.prompt_tokens, output_tokens,
               info=SimRequest(info, body))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    mean_e2e: float
    p99_e2e: float
    mean_ttft: float
    p99_ttft: float
    mean_tpot: float
    p99_tpot: float


def summarise(jobs: Sequence[Job]) -> Summary:
    done = [j for j in jobs if j.finished is not None]
    e2e = [j.latency or 0.0 for j in done]
    ttft = [j.ttft or 0.0 for j in done]
    tpot = [t for j in done if (t := j.tpot) is not None]
    return Summary(
        len(done), sum(e2e) / len(e2e), quantile(e2e, 0.99), sum(ttft) / len(ttft),
        quantile(ttft, 0.99), sum(tpot) / len(tpot), quantile(tpot, 0.99),
    )  # fmt: skip


def simulate(specs: Sequence[EngineSpec], front: GateFrontend, jobs: Sequence[Job]) -> list[Job]:
    """Run fresh copies of `jobs` (so one list serves every policy: the frontend stamps its
    predictions on the copies) through the simulator."""
    fresh = [
        Job(j.id, j.arrival, j.model, j.prompt_tokens, j.output_tokens,
            SimRequest(j.info.info, j.info.body))
        for j in jobs
    ]  # fmt: skip
    sim = ClusterSim(specs, front)
    front.sim = sim
    return sim.run(fresh)
