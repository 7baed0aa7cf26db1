"""The gateway's gate on the cluster simulator's clock.

`GateFrontend` is `gateway.http.gate.Gate` without the asyncio: the same `Admission` (OIT), token
buckets (`MemoryStore`), `Dispatcher` with its fairness policy and the same router, driven by
`engines.cluster.ClusterSim` callbacks instead of HTTP requests. A simulated request is a
`Job` whose `info` is the `RequestInfo` the gateway would have built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from engines.cluster import ClusterSim, Job
from gateway.config.schema import Config
from gateway.core.admission import Admission, Keyed
from gateway.core.dispatch import Decision, build_dispatcher
from gateway.core.fairness import Ticket
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import Endpoint, RequestInfo
from gateway.routing.policies import RoutingPolicy
from gateway.state.buckets import MemoryStore


def request_info(
    job_id: str,
    tenant: str,
    app: str,
    model: str,
    prompt_tokens: int,
    arrival: float,
    max_tokens: int | None = None,
    interaction: str | None = None,
) -> RequestInfo:
    """The RequestInfo the gateway would build for a streaming chat request."""
    return RequestInfo(
        job_id, tenant, app, interaction, model, Endpoint.CHAT, prompt_tokens, max_tokens,
        True, False, arrival,
    )  # fmt: skip


@dataclass(slots=True)
class _Entry:
    ticket: Ticket
    keys: Keyed
    cost: float


class GateFrontend:
    """Admission, fairness queue and routing for the simulator. `oit=False` turns the token
    buckets off (a pure scheduling comparison)."""

    def __init__(self, cfg: Config, router: RoutingPolicy, oit: bool = True) -> None:
        self.cfg = cfg
        self.router = router
        self.oit = oit
        self.sim: ClusterSim | None = None
        self.dispatcher = build_dispatcher(cfg, self._snapshots, self._route)
        self.admission = Admission(cfg, self.dispatcher)
        self.store = MemoryStore()
        self.entries: dict[str, _Entry] = {}
        self._ready: list[tuple[Job, str]] = []

    def _snapshots(self, model: str) -> list[EngineSnapshot]:
        assert self.sim is not None, "attach the simulator: frontend.sim = sim"
        out = []
        for e in self.sim.engines_of(model):
            running, waiting, kv = e.gauges()
            pending = sum(s.prompt_tokens for s in e.seqs.values() if s.output == 0)
            sp = e.spec
            out.append(EngineSnapshot(sp.id, sp.region, sp.model, True, running, waiting, kv,
                                      len(e.jobs), pending))  # fmt: skip
        return out

    def _route(self, t: Ticket, engines: list[EngineSnapshot]) -> str:
        job: Job = t.payload
        return self.router.choose(job.info, engines)

    def on_arrival(self, job: Job, now: float) -> None:
        info: RequestInfo = job.info
        a = self.admission.prepare(info, now)
        if self.oit:
            verdict = self.store.admit_at(a.keys, a.cost, a.need, a.enforce, now)
            if not verdict.admitted:
                job.rejected = "throttled"
                return
        a.ticket.payload = job
        decision, engine = self.dispatcher.submit(a.ticket, info.model, now)
        if decision in (Decision.START, Decision.QUEUED):
            self.admission.admitted(info, now)
        if decision is Decision.START:
            self._ready.append((job, engine))
        elif decision is not Decision.QUEUED:
            job.rejected = decision.value
            return
        self.entries[job.id] = _Entry(a.ticket, a.keys if self.oit else (), a.cost)

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        # Rate-limit windows open with time alone; the gateway arms a timer for them.
        for model, policy in self.dispatcher.policies.items():
            if policy.name == "rpm" and policy.waiting():
                self._ready.extend((t.payload, e) for t, e in self.dispatcher.poll(model, now))
        out, self._ready = self._ready, []
        return out

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        self.dispatcher.on_tokens(self.entries[job.id].ticket, job.model, n)

    def on_finish(self, job: Job, now: float) -> None:
        e = self.entries.pop(job.id)
        started = self.dispatcher.finish(e.ticket, job.model, job.prompt_tokens, job.generated, now)
        self._ready.extend((t.payload, engine) for t, engine in started)
        real = job.prompt_tokens + job.generated
        if e.keys and real != e.cost:
            self.store.admit_at(e.keys, real - e.cost, 0.0, False, now)

    def wake_at(self, now: float) -> float | None:
        times = [t for p in self.dispatcher.policies.values() if (t := p.wake_at(now))]
        return min(times) if times else None
