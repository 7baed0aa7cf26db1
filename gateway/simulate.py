"""The gateway's gate core on the cluster simulator's clock: the one simulator frontend.

`GateFrontend` is `engines.cluster_parts.Frontend` made of the gateway's own objects: the very
`GateCore` the gateway runs (admission and OIT, the fairness queue, routing with the configured
policy, the ledger's per-engine view), token buckets in a `MemoryStore`, and, when given, the
same `LengthService` that predicts output lengths in the gateway. Only the clock and the
engines differ: virtual time, and `engines.cluster` engines whose gauges are scraped every
`scrape_interval` virtual seconds, as the health loop scrapes real ones.

A simulated request is a `Job` whose `info` is a `SimRequest`: the `RequestInfo` the gateway
would have built and, for length prediction, the request body.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engines.cluster import ClusterSim, Job
from engines.cluster_parts import SimulatedEngine
from gateway.config.schema import Config
from gateway.core.dispatch import Decision
from gateway.core.gate import GateCore, Router, Slot
from gateway.core.ledger import EngineLimit
from gateway.core.request import Endpoint, RequestInfo
from gateway.lengths.features import Record
from gateway.lengths.service import LengthService
from gateway.state.memory import MemoryStore


@dataclass(slots=True)
class SimRequest:
    """What travels with a simulated job: the gateway's view of the request."""

    info: RequestInfo
    body: dict[str, Any] = field(default_factory=dict)  # for the length predictor's features
    record: Record | None = None  # the features, once predicted


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
class _Engine:
    """A simulated engine as the gateway's registry sees it: gauges as last scraped."""

    engine: SimulatedEngine
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight_at_scrape: int = 0  # the gateway's own requests there at the scrape
    routable: bool = True

    @property
    def id(self) -> str:
        return self.engine.spec.id

    @property
    def region(self) -> str:
        return self.engine.spec.region

    @property
    def model(self) -> str:
        return self.engine.spec.model


class GateFrontend:
    """The gateway's gate core for the simulator; see the module docstring.

    `oit=False` turns the token buckets off (a pure scheduling comparison). `oracle` gives the
    router the true output length instead of a prediction, as an upper bound of what
    prediction can buy. Engines not in `cfg.engines` get the limits a config would give them
    by default (`max_num_seqs` requests, the modelled KV capacity in tokens)."""

    def __init__(
        self,
        cfg: Config,
        router: Router,
        *,
        lengths: LengthService | None = None,
        oit: bool = True,
        scrape_interval: float = 0.0,
        oracle: bool = False,
    ) -> None:
        self.core = GateCore(cfg, self, router)
        self.lengths = lengths
        self.oit = oit
        self.scrape_interval = scrape_interval
        self.oracle = oracle
        self.store = MemoryStore()
        self.slots: dict[str, Slot] = {}
        self._sim: ClusterSim | None = None
        self._views: dict[str, list[_Engine]] = {}
        self._scraped_at = -math.inf
        self._now = 0.0
        self._ready: list[tuple[Job, str]] = []
        # Demand is counted on the simulation's clock: seconds from its start (minute 0).
        self.core.clock = lambda: self._now

    @property
    def sim(self) -> ClusterSim | None:
        return self._sim

    @sim.setter
    def sim(self, sim: ClusterSim | None) -> None:
        """Attach the simulator: its engines join the gate core's ledger."""
        self._sim = sim
        self._views = {}
        if sim is None:
            return
        for engines in sim.by_model.values():
            for e in engines:
                self._join(e)

    def _join(self, e: SimulatedEngine) -> None:
        self._views.setdefault(e.spec.model, []).append(_Engine(e, routable=not e.draining))
        if e.spec.id not in {c.id for c in self.core.cfg.engines}:
            limit = EngineLimit(
                max_running=e.spec.max_num_seqs, max_tokens=e.perf.kv_capacity_tokens
            )
            self.core.set_limit(e.spec.id, limit)

    # Fleet changes, as the gateway's registry follows joins, drains and leaves -------------

    def on_engine_ready(self, engine: SimulatedEngine, now: float) -> None:
        """An engine finished starting: it joins the ledger, and waiting requests may start."""
        self._now = now
        self._join(engine)
        self._scraped_at = -math.inf  # its gauges are read at once, as on a join
        self._start(self.core.poll(engine.spec.model, now))

    def on_engine_drain(self, engine: SimulatedEngine, now: float) -> None:
        """No new requests to the engine; those there finish."""
        for v in self._views.get(engine.spec.model, []):
            if v.engine is engine:
                v.routable = False

    def on_engine_gone(self, engine: SimulatedEngine, now: float) -> None:
        views = self._views.get(engine.spec.model, [])
        views[:] = [v for v in views if v.engine is not engine]
        self.core.drop_engine(engine.spec.id)

    # The fleet, as the gate core reads it ---------------------------------------------------

    def engines_of(self, model: str) -> Sequence[_Engine]:
        views = self._views.get(model, [])
        if self._now - self._scraped_at >= self.scrape_interval:
            self._scraped_at = self._now
            in_flight = self.core.ledger.in_flight
            for models in self._views.values():
                for v in models:
                    v.running, v.waiting, v.kv_usage = v.engine.gauges()
                    v.in_flight_at_scrape = in_flight(v.id)
        return views

    # engines.cluster_parts.Frontend ---------------------------------------------------------

    def on_arrival(self, job: Job, now: float) -> None:
        self._now = now
        req: SimRequest = job.info
        info = replace(req.info, arrival=now)  # the gateway stamps arrival when it receives it
        if self.lengths is not None:
            info, req.record = self.lengths.annotate(info, req.body)
        if self.oracle:
            info = replace(info, predicted_output_tokens=job.output_tokens,
                           predicted_output_upper=job.output_tokens)  # fmt: skip
        req.info = info
        a = self.core.prepare(info, now)
        if self.oit:
            verdict = self.store.admit_at(a.keys, a.cost, a.need, a.enforce, now)
            if not verdict.admitted:
                job.rejected = "throttled"
                return
        decision, slot = self.core.submit(info, a, now)
        slot.payload = job
        if decision is Decision.START:
            self._ready.append((job, slot.engine))
        elif decision is not Decision.QUEUED:
            job.rejected = decision.value
            if self.oit:
                self.store.admit_at(a.keys, -a.cost, 0.0, False, now)
            return
        self.slots[job.id] = slot

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        self._now = now
        # Rate-limit windows open, and batch deadlines come near or pass, with time alone; the
        # gateway arms a timer for them.
        for model in self.core.models:
            for slot in self.core.expire(model, now):
                job = slot.payload
                del self.slots[job.id]
                job.rejected = "batch_deadline_exceeded"  # never started
                if self.oit:
                    self.store.admit_at(slot.keys, -slot.cost, 0.0, False, now)
            when = self.core.wake_at(model, now)
            if when is not None and when <= now:
                self._start(self.core.poll(model, now))
        out, self._ready = self._ready, []
        return out

    def _start(self, slots: list[Slot]) -> None:
        self._ready.extend((s.payload, s.engine) for s in slots)

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        self.core.on_tokens(self.slots[job.id], n)

    def on_finish(self, job: Job, now: float) -> None:
        self._now = now
        slot = self.slots.pop(job.id)
        started, delta = self.core.finish(slot, job.prompt_tokens, job.generated, now)
        self._start(started)
        if self.oit and delta:
            self.store.admit_at(slot.keys, delta, 0.0, False, now)
        req: SimRequest = job.info
        if self.lengths is not None and req.record is not None:
            self.lengths.finish(req.info, req.record, job.generated)

    def wake_at(self, now: float) -> float | None:
        times = [t for m in self.core.models if (t := self.core.wake_at(m, now)) is not None]
        return min(times) if times else None
