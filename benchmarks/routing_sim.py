"""The gateway's routing path inside the cluster simulator.

`GatewayFrontend` is `engines.cluster.Frontend` made of the gateway's own objects: for each
arrival it adds the application's history to the request's features, asks the
`LengthPredictor` for (median, upper) output tokens, builds each engine's `EngineSnapshot` from
what the gateway would know (its own in-flight requests, prompt and predicted decode tokens,
and the engine's gauges as last scraped), and calls the configured `RoutingPolicy.choose`.
Nothing is re-implemented for the simulator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from engines.cluster import ClusterSim, EngineSpec, Job
from engines.tokens import chat_prompt_tokens
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import Endpoint, RequestInfo
from gateway.lengths.features import Record, extract
from gateway.lengths.predictor import LengthPredictor
from gateway.routing.latency import add_prompt
from gateway.routing.policies import RoutingPolicy


@dataclass(slots=True)
class _View:
    """The gateway's EngineState for one simulated engine."""

    in_flight: int = 0
    prompt: int = 0
    decode: int = 0
    prompt_rate: float = 0.0
    prompt_at: float = 0.0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


class GatewayFrontend:
    """Route on arrival with a gateway policy; see the module docstring.

    `scrape_interval` is how stale the scraped gauges (running, waiting, KV use) are allowed to
    be, in virtual seconds (0: always fresh). `oracle` gives the policy the true output length
    instead of a prediction, as an upper bound of what prediction can buy.
    """

    def __init__(
        self,
        policy: RoutingPolicy,
        predictor: LengthPredictor | None = None,
        *,
        scrape_interval: float = 0.0,
        oracle: bool = False,
    ) -> None:
        self.policy = policy
        self.predictor = predictor
        self.scrape_interval = scrape_interval
        self.oracle = oracle
        self.sim: ClusterSim | None = None
        self._views: dict[str, _View] = {}
        self._scraped_at = -math.inf
        self._ready: list[tuple[Job, str]] = []

    def _snapshots(self, model: str, now: float) -> list[EngineSnapshot]:
        assert self.sim is not None, "attach the simulator: frontend.sim = sim"
        engines = self.sim.by_model.get(model, [])
        fresh = now - self._scraped_at >= self.scrape_interval
        if fresh:
            self._scraped_at = now
        out = []
        for e in engines:
            v = self._views.setdefault(e.spec.id, _View())
            if fresh:
                v.running, v.waiting = len(e.sched.running), len(e.sched.waiting)
                v.kv_usage = e.sched.kv_usage
            s = e.spec
            out.append(EngineSnapshot(s.id, s.region, s.model, True, v.running, v.waiting,
                                      v.kv_usage, v.in_flight, v.prompt, v.decode, v.prompt_rate,
                                      v.prompt_at))  # fmt: skip
        return out

    def on_arrival(self, job: Job, now: float) -> None:
        info, rec = job.info
        info = replace(info, arrival=now)  # the gateway stamps arrival when it receives it
        if self.oracle:
            info = replace(info, predicted_output_tokens=job.output_tokens,
                           predicted_output_upper=job.output_tokens)  # fmt: skip
        elif self.predictor is not None:
            med, up = self.predictor.predict(self.predictor.with_history(rec))
            info = replace(info, predicted_output_tokens=med, predicted_output_upper=up)
        job.info = (info, rec)
        engine = self.policy.choose(info, self._snapshots(job.model, now))
        v = self._views[engine]
        v.in_flight += 1
        v.prompt += info.prompt_tokens
        v.decode += info.predicted_output_tokens or 0
        v.prompt_rate, v.prompt_at = add_prompt(v.prompt_rate, v.prompt_at, now, info.prompt_tokens)
        self._ready.append((job, engine))

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        out, self._ready = self._ready, []
        return out

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        pass

    def on_finish(self, job: Job, now: float) -> None:
        info, rec = job.info
        assert job.engine is not None
        v = self._views[job.engine]
        v.in_flight -= 1
        v.prompt -= info.prompt_tokens
        v.decode -= info.predicted_output_tokens or 0
        if self.predictor is not None:
            self.predictor.observe(rec, job.generated)


def make_job(rid: str, t: float, tenant: str, app: str, body: dict[str, Any],
             output_tokens: int, region: str = "r0") -> Job:  # fmt: skip
    """A simulator job carrying the RequestInfo and feature record the gateway would build."""
    prompt = chat_prompt_tokens(body["messages"])
    info = RequestInfo(
        id=rid, tenant=tenant, app=app, interaction_id=None, model=body["model"],
        endpoint=Endpoint.CHAT, prompt_tokens=prompt, max_tokens=body.get("max_tokens"),
        stream=True, include_usage=True, arrival=t,
    )  # fmt: skip
    rec: Record = extract(info, body)
    return Job(rid, t, body["model"], prompt, output_tokens, info=(info, rec))


def fleet(n: int, model: str = "llama-3.1-8b", gpu: str = "H100") -> list[EngineSpec]:
    return [EngineSpec(f"e{i}", "r0", model, arch=model, gpu=gpu) for i in range(n)]


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    mean_e2e: float
    p99_e2e: float
    mean_ttft: float
    p99_ttft: float
    mean_tpot: float
    p99_tpot: float


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else math.nan


def summarise(jobs: Sequence[Job]) -> Summary:
    done = [j for j in jobs if j.finished is not None]
    e2e = [j.latency or 0.0 for j in done]
    ttft = [j.ttft or 0.0 for j in done]
    tpot = [t for j in done if (t := j.tpot) is not None]
    return Summary(
        len(done), sum(e2e) / len(e2e), _pct(e2e, 0.99), sum(ttft) / len(ttft),
        _pct(ttft, 0.99), sum(tpot) / len(tpot), _pct(tpot, 0.99),
    )  # fmt: skip


def simulate(specs: Sequence[EngineSpec], front: GatewayFrontend, jobs: list[Job]) -> list[Job]:
    """Run fresh copies of `jobs` (so one list serves every policy) through the simulator."""
    fresh = [Job(j.id, j.arrival, j.model, j.prompt_tokens, j.output_tokens, j.info)
             for j in jobs]  # fmt: skip
    sim = ClusterSim(specs, front)
    front.sim = sim
    return sim.run(fresh)
