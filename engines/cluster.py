"""Discrete-event cluster simulator: many engines, one virtual clock, hours of trace in seconds.

Each engine is the simulated engine's own `Scheduler` stepped by the same `PerfModel`, so a step
takes exactly the time the live simulated engine would sleep for it. Nothing here decides where
or when a request runs: a `Frontend` does. It is the gateway's pure policy code (admission, the
fairness queue, the router) adapted to the simulator's callbacks, so the simulator runs the very
objects the gateway runs. `engines` does not import `gateway`; the frontend brings the policies.

Events are arrivals and step ends. After each event the frontend may start requests; a request
that is started goes straight into the engine's scheduler, as a proxied request does.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.perf_model import PerfModel
from engines.sim.scheduler import Scheduler, Sequence, StepPlan


@dataclass(frozen=True, slots=True)
class EngineSpec:
    id: str
    region: str
    model: str  # the name requests ask for
    arch: str = "llama-3.1-8b"  # performance-model preset
    gpu: str = "H100"
    tp: int = 1
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    block_size: int = 16


@dataclass(slots=True, eq=False)
class Job:
    """One request's life in the simulator. `info` is opaque here: it is what the frontend's
    policies see (the gateway's `RequestInfo`)."""

    id: str
    arrival: float
    model: str
    prompt_tokens: int
    output_tokens: int  # what the engine will generate (known to the simulator only)
    info: Any = None
    engine: str | None = None
    started: float | None = None  # left the gateway for an engine
    first_token: float | None = None
    finished: float | None = None
    generated: int = 0
    rejected: str | None = None  # why the frontend refused it, if it did

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished is None or self.first_token is None or self.generated < 2:
            return None
        return (self.finished - self.first_token) / (self.generated - 1)


@dataclass(slots=True, eq=False)
class SimulatedEngine:
    spec: EngineSpec
    perf: PerfModel
    sched: Scheduler
    jobs: dict[str, Job] = field(default_factory=dict)  # started here, not finished
    seqs: dict[str, Sequence] = field(default_factory=dict)
    plan: StepPlan | None = None  # the step running now
    busy_s: float = 0.0
    steps: int = 0

    @classmethod
    def build(cls, spec: EngineSpec) -> SimulatedEngine:
        perf = PerfModel.named(spec.gpu, spec.arch, spec.tp)
        sched = Scheduler(
            kv_blocks=perf.kv_capacity_tokens // spec.block_size,
            block_size=spec.block_size,
            max_num_seqs=spec.max_num_seqs,
            max_batched_tokens=spec.max_batched_tokens,
        )
        return cls(spec, perf, sched)

    @property
    def id(self) -> str:
        return self.spec.id

    def gauges(self) -> tuple[int, int, float]:
        """What the engine's `/metrics` would say now: running, waiting, KV use (0..1)."""
        return len(self.sched.running), len(self.sched.waiting), self.sched.kv_usage


class Frontend(Protocol):
    """The gateway side of the simulation. Every callback gets the virtual time `now`."""

    def on_arrival(self, job: Job, now: float) -> None:
        """A request arrived: admit, queue or reject it (set `job.rejected`)."""
        ...

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        """Requests to start now, each with the id of its engine; called after every event."""
        ...

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        """`n` more output tokens of `job` were generated (streamed to the client)."""
        ...

    def on_finish(self, job: Job, now: float) -> None: ...


class ClusterSim:
    """Engines from `specs`, driven by `frontend`, fed by `jobs` (sorted by arrival)."""

    def __init__(self, specs: Iterable[EngineSpec], frontend: Frontend) -> None:
        self.engines: dict[str, SimulatedEngine] = {}
        self.by_model: dict[str, list[SimulatedEngine]] = {}
        for spec in specs:
            if spec.id in self.engines:
                raise ValueError(f"duplicate engine id {spec.id!r}")
            engine = SimulatedEngine.build(spec)
            self.engines[spec.id] = engine
            self.by_model.setdefault(spec.model, []).append(engine)
        self.frontend = frontend
        self.now = 0.0
        # Step ends (an engine) and wake-ups the frontend asked for (None).
        self._events: list[tuple[float, int, SimulatedEngine | None]] = []
        self._wake_at: float | None = None
        self._tie = itertools.count()

    def engines_of(self, model: str) -> list[SimulatedEngine]:
        return list(self.by_model.get(model, ()))

    def run(
        self,
        jobs: Iterable[Job],
        until: float | None = None,
        on_event: Callable[[], None] = lambda: None,
    ) -> list[Job]:
        """Simulate until every job has finished (or `until`); returns the jobs in arrival
        order. `on_event` runs after each event, e.g. to sample per-tenant service."""
        done: list[Job] = []
        arrivals: Iterator[Job] = iter(jobs)
        nxt = next(arrivals, None)
        while nxt is not None or self._events:
            t_step = self._events[0][0] if self._events else float("inf")
            if nxt is not None and nxt.arrival <= t_step:
                self.now = nxt.arrival
                if until is not None and self.now > until:
                    break
                done.append(nxt)
                self.frontend.on_arrival(nxt, self.now)
                nxt = next(arrivals, None)
            else:
                self.now, _, engine = heapq.heappop(self._events)
                if until is not None and self.now > until:
                    break
                if engine is None:
                    self._wake_at = None
                else:
                    self._step_done(engine)
            self._dispatch()
            self._arm_wake()
            on_event()
        return done

    def _dispatch(self) -> None:
        for job, engine_id in self.frontend.ready(self.now):
            engine = self.engines[engine_id]
            if engine.spec.model != job.model:
                raise ValueError(f"{job.id}: engine {engine_id} does not serve {job.model}")
            job.engine, job.started = engine_id, self.now
            seq = Sequence(job.id, job.prompt_tokens, max(1, job.output_tokens))
            engine.jobs[job.id] = job
            engine.seqs[job.id] = seq
            engine.sched.add(seq)
            if engine.plan is None:
                self._start_step(engine)

    def _arm_wake(self) -> None:
        """A frontend with rate limits may name a time to be asked again (`wake_at`)."""
        wake_at = getattr(self.frontend, "wake_at", None)
        when = wake_at(self.now) if wake_at is not None else None
        if when is not None and when > self.now and when != self._wake_at:
            self._wake_at = when
            heapq.heappush(self._events, (when, next(self._tie), None))

    def _start_step(self, engine: SimulatedEngine) -> None:
        plan = engine.sched.schedule()
        if not plan:
            engine.plan = None  # idle, or the head needs more KV than exists: wait
            return
        dt = engine.perf.step_time(plan.work())
        engine.plan = plan
        engine.busy_s += dt
        engine.steps += 1
        heapq.heappush(self._events, (self.now + dt, next(self._tie), engine))

    def _step_done(self, engine: SimulatedEngine) -> None:
        assert engine.plan is not None
        for seq in engine.sched.complete(engine.plan):
            job = engine.jobs[seq.rid]
            job.generated += 1
            if job.first_token is None:
                job.first_token = self.now
            self.frontend.on_tokens(job, 1, self.now)
            if seq.finished:
                job.finished = self.now
                del engine.jobs[seq.rid], engine.seqs[seq.rid]
                self.frontend.on_finish(job, self.now)
        engine.plan = None
        self._start_step(engine)


class RouteOnArrival:
    """The simplest frontend: no admission, no queue; each request is routed as it arrives.
    `choose(job, engines)` picks one of the model's simulated engines by id."""

    def __init__(self, choose: Callable[[Job, list[SimulatedEngine]], str]) -> None:
        self.choose = choose
        self.sim: ClusterSim | None = None
        self._ready: list[tuple[Job, str]] = []

    def on_arrival(self, job: Job, now: float) -> None:
        assert self.sim is not None, "attach the simulator: frontend.sim = sim"
        self._ready.append((job, self.choose(job, self.sim.engines_of(job.model))))

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        out, self._ready = self._ready, []
        return out

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        pass

    def on_finish(self, job: Job, now: float) -> None:
        pass
