"""The cluster simulator's parts: an engine's spec, one request's life (`Job`), one simulated
engine (the simulated engine's own `Scheduler` and the `PerfModel` that times its steps), and
the `Frontend` protocol through which the gateway's policies drive engines.cluster.ClusterSim.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.perf_model import DecodeRun, PerfModel
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
    asked_at: float = 0.0  # paid from here
    ready_at: float = 0.0  # serving from here
    gone_at: float | None = None
    draining: bool = False
    run: DecodeRun | None = None  # a coalesced run of decode steps in flight
    epoch: int = 0  # step-end events of an older epoch were cut short and are void

    @property
    def gpus(self) -> int:
        return self.spec.tp

    def gpu_seconds(self, now: float) -> float:
        """GPUs x seconds from being asked for to gone (or `now`)."""
        end = now if self.gone_at is None else self.gone_at
        return self.spec.tp * max(0.0, end - self.asked_at)

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
    """The gateway side of the simulation. Every callback gets the virtual time `now`.

    Optional, looked up by name: `wake_at(now)` (a time to be asked again), and the fleet
    hooks `on_engine_ready(engine, now)`, `on_engine_drain(engine, now)` and
    `on_engine_gone(engine, now)`."""

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
