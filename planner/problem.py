"""The planning problem and its answer as plain values: what the ILP takes and returns.

Units: demand and capacity in tokens per second (the planner uses prompt tokens, as SageServe
does), batch work in tokens, time in slots of `slot_minutes`, cost per GPU-hour. Slot 0 starts
now; an engine asked for at the start of slot s serves from the first slot that begins after
its start-up time has passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Key = tuple[str, str, str]  # (model, region, GPU type)


@dataclass(frozen=True, slots=True)
class GpuType:
    name: str
    cost_per_hour: float  # per GPU

    def __post_init__(self) -> None:
        if self.cost_per_hour < 0:
            raise ValueError(f"gpus.{self.name}.cost_per_hour must be >= 0")


@dataclass(frozen=True, slots=True)
class EngineType:
    """One model served on one GPU type: `gpus` GPUs per engine (tensor parallel)."""

    model: str
    gpu: str
    gpus: int
    tokens_per_s: float  # at the SLO (planner.capacity)
    startup_min: float  # from being asked for to serving: pull, load weights, warm up

    def __post_init__(self) -> None:
        where = f"engines.{self.model}.{self.gpu}"
        if self.gpus < 1:
            raise ValueError(f"{where}.gpus must be >= 1, got {self.gpus}")
        if self.tokens_per_s <= 0:
            raise ValueError(f"{where}.tokens_per_s must be > 0, got {self.tokens_per_s}")
        if self.startup_min < 0:
            raise ValueError(f"{where}.startup_min must be >= 0, got {self.startup_min}")


@dataclass(frozen=True, slots=True)
class BatchDemand:
    """Delay-tolerant work: `tokens` of `model` to finish by the end of slot `deadline_slot`,
    in any of `regions` (all when empty), no earlier than slot `release_slot`. A deadline past
    the horizon leaves the work optional in this plan."""

    id: str
    model: str
    tokens: float
    deadline_slot: int
    release_slot: int = 0
    regions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"batch.{self.id}.tokens must be >= 0, got {self.tokens}")
        if self.release_slot < 0:
            raise ValueError(f"batch.{self.id}.release_slot must be >= 0")


@dataclass(frozen=True, slots=True)
class RunningEngine:
    """Engines that exist now, asked for `age_min` minutes ago (still starting while
    `age_min` < the type's start-up time)."""

    model: str
    region: str
    gpu: str
    age_min: float
    count: int = 1

    def __post_init__(self) -> None:
        if self.age_min < 0 or self.count < 0:
            raise ValueError(f"current engine {self.model}/{self.region}/{self.gpu}: bad age/count")


@dataclass(frozen=True, slots=True)
class PlanInput:
    regions: tuple[str, ...]
    gpus: tuple[GpuType, ...]
    engines: tuple[EngineType, ...]
    slots: int
    slot_minutes: float
    # (model, region) -> tokens/s per slot, already the forecast's high quantile.
    interactive: Mapping[tuple[str, str], tuple[float, ...]]
    batch: tuple[BatchDemand, ...] = ()
    # (region, GPU type) -> GPUs; a pair not named has no quota.
    quotas: Mapping[tuple[str, str], int] = field(default_factory=dict)
    current: tuple[RunningEngine, ...] = ()
    headroom: float = 0.2  # interactive capacity >= (1 + headroom) x demand
    # Every engine started is also charged its start-up GPU-hours times this weight: the
    # waste SageServe counts, which keeps the plan from starting engines for a short peak.
    startup_weight: float = 1.0
    churn_gpu_hours: float = 0.05  # per engine added or removed, per GPU
    # (model, region) -> engines kept in every slot whatever the forecast says.
    min_engines: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.slot_minutes <= 0:
            raise ValueError(
                f"slots and slot_minutes must be > 0, got {self.slots}, {self.slot_minutes}"
            )
        if self.headroom < 0 or self.startup_weight < 0 or self.churn_gpu_hours < 0:
            raise ValueError("headroom, startup_weight and churn_gpu_hours must be >= 0")
        regions, gpus = set(self.regions), {g.name for g in self.gpus}
        if len(regions) != len(self.regions) or len(gpus) != len(self.gpus):
            raise ValueError("regions and gpus must be unique")
        types = set()
        for e in self.engines:
            if e.gpu not in gpus:
                raise ValueError(f"engines.{e.model}.{e.gpu}: unknown GPU type {e.gpu!r}")
            if (e.model, e.gpu) in types:
                raise ValueError(f"engines.{e.model}.{e.gpu} given twice")
            types.add((e.model, e.gpu))
        models = {m for m, _ in types}
        for (m, r), series in self.interactive.items():
            if m not in models:
                raise ValueError(f"interactive.{m}: no engine type serves model {m!r}")
            if r not in regions:
                raise ValueError(f"interactive.{m}.{r}: unknown region {r!r}")
            if len(series) != self.slots or not all(math.isfinite(v) and v >= 0 for v in series):
                raise ValueError(f"interactive.{m}.{r} needs {self.slots} values >= 0")
        for b in self.batch:
            if b.model not in models:
                raise ValueError(f"batch.{b.id}: no engine type serves model {b.model!r}")
            if not set(b.regions) <= regions:
                raise ValueError(f"batch.{b.id}: unknown regions {set(b.regions) - regions}")
        if len({b.id for b in self.batch}) != len(self.batch):
            raise ValueError("batch ids must be unique")
        for (r, g), q in self.quotas.items():
            if r not in regions or g not in gpus or q < 0:
                raise ValueError(f"quotas.{r}.{g}: unknown region or GPU type, or < 0")
        for c in self.current:
            if (c.model, c.gpu) not in types or c.region not in regions:
                raise ValueError(f"current engine {c.model}/{c.region}/{c.gpu} has no type")
        for (m, r), n in self.min_engines.items():
            if m not in models or r not in regions or n < 0:
                raise ValueError(f"min_engines.{m}.{r}: unknown model or region, or < 0")

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(sorted({e.model for e in self.engines}))

    def delay_slots(self, e: EngineType) -> int:
        """Slots from asking for an engine to the first slot it serves in full."""
        # The tolerance keeps 10 min / 5 min slots at 2 despite float noise.
        return max(0, math.ceil(e.startup_min / self.slot_minutes - 1e-9))


@dataclass(frozen=True, slots=True)
class Allocation:
    """Engines of one (model, region, GPU type) per slot: allocated (and paid), serving, and
    asked for at the start of the slot."""

    model: str
    region: str
    gpu: str
    engines: tuple[int, ...]
    ready: tuple[int, ...]
    started: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class BatchAssignment:
    id: str
    region: str
    slot: int
    tokens: float


ShortfallKind = Literal["quota", "startup", "deadline"]


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One demand the program cannot meet, and the constraint that stops it."""

    kind: ShortfallKind
    model: str
    region: str | None  # None for batch work that no region can take
    slot: int | None
    missing: float  # tokens/s (interactive) or tokens (batch)
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    allocations: tuple[Allocation, ...]
    batch: tuple[BatchAssignment, ...]
    cost: float  # objective: GPU-hours, start-ups and churn, priced
    gpu_hours: float
    scale_ups: int  # engines started over the horizon
    startup_gpu_hours: float  # GPU-hours of those engines spent starting
    solver: str
    optimal: bool  # False: the best solution found within the time limit
    solve_s: float
    build_s: float
    # Interactive demand of the first slots that no engine can meet: those asked for now serve
    # only after their start-up, and the running ones do not suffice. Expected, not infeasible:
    # the program meets what it can and names the rest (kind "startup").
    shortfalls: tuple[Shortfall, ...] = ()

    def engines(self, model: str, region: str, gpu: str) -> tuple[int, ...]:
        for a in self.allocations:
            if (a.model, a.region, a.gpu) == (model, region, gpu):
                return a.engines
        raise KeyError((model, region, gpu))

    def first_slot(self) -> dict[Key, int]:
        """Engine counts to apply now: what an actuator acts on."""
        return {(a.model, a.region, a.gpu): a.engines[0] for a in self.allocations}


class Infeasible(Exception):
    """No plan meets every demand that a plan could meet: a quota or a batch deadline binds
    (start-up shortfalls alone leave the program feasible: `Plan.shortfalls`). `shortfalls`
    name what is missing and why; `best_effort` is the cheapest plan that misses the least,
    for a caller that must act anyway."""

    def __init__(
        self,
        shortfalls: tuple[Shortfall, ...],
        best_effort: Plan | None,
        first_solve_s: float = 0.0,
    ) -> None:
        self.shortfalls = shortfalls
        self.best_effort = best_effort
        # Wall time of the program found infeasible; `best_effort.solve_s` is the elastic copy's.
        self.first_solve_s = first_solve_s
        lines = "; ".join(s.detail for s in shortfalls[:5])
        more = f" (and {len(shortfalls) - 5} more)" if len(shortfalls) > 5 else ""
        super().__init__(f"no feasible plan: {lines}{more}")
