"""The planner's periodic step: demand history -> forecast -> integer program -> engine actions.

`decide` is pure: it takes the per-minute demand, the engines there are (with when they were
asked for and their state), the settings and the time, and returns what to start and what to
drain, with the plan behind it. The guards sit between the plan and the actions: an engine
younger than `min_lifetime_s` is not drained, engines still starting count as allocated,
engines an actuator reported as failed are left out (the program sees only the others, so it
plans their replacement) and a (model, region, GPU type) whose start failed is given no new
start for `retry_after_s`. An infeasible program is logged with its binding shortfalls and its
best-effort plan is applied (the last good plan when there is none).

`Controller` is the thin asyncio loop around it: every `interval_s` (or at once when an
actuator reports a failed start) it reads demand and engines, decides, and applies the first
slot through an actuator (planner.actuators).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from planner.forecast import (
    ForecastConfig,
    SlotForecast,
    deadline_slots,
    forecast,
    program_demand,
)
from planner.ilp import Solver, SolverError, solve
from planner.problem import (
    EngineType,
    GpuType,
    Infeasible,
    Key,
    Plan,
    PlanInput,
    RunningEngine,
    Shortfall,
)

log = structlog.get_logger("fairway.planner")

DemandKey = tuple[str, str, str]  # (model, region, class), as the gateway counts demand
EngineStatus = Literal["starting", "serving", "draining", "failed"]
RunStatus = Literal["ok", "infeasible", "error"]


@dataclass(frozen=True, slots=True)
class Settings:
    """What the planner needs of `[planner]`, resolved (gateway.config.planner builds it)."""

    regions: tuple[str, ...]
    gpus: tuple[GpuType, ...]
    engines: tuple[EngineType, ...]
    slot_minutes: int = 5
    slots: int = 12
    history_minutes: int = 360
    quantile: float = 0.95
    headroom: float = 0.2
    solver: Solver = "auto"
    time_limit_s: float = 10.0
    min_lifetime_s: float = 600.0
    drain_deadline_s: float = 300.0
    batch_deadline_min: float = 60.0
    retry_after_s: float = 300.0
    quotas: Mapping[tuple[str, str], int] = field(default_factory=dict)
    min_engines: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @property
    def keys(self) -> tuple[Key, ...]:
        return tuple((e.model, r, e.gpu) for e in self.engines for r in self.regions)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.model for e in self.engines))


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """One engine as an actuator knows it; `started_at` is when it was asked for (clock s)."""

    id: str
    model: str
    region: str
    gpu: str
    started_at: float
    status: EngineStatus
    detail: str = ""  # why it failed

    @property
    def key(self) -> Key:
        return (self.model, self.region, self.gpu)


@dataclass(frozen=True, slots=True)
class Start:
    model: str
    region: str
    gpu: str
    count: int = 1

    @property
    def key(self) -> Key:
        return (self.model, self.region, self.gpu)


@dataclass(frozen=True, slots=True)
class Drain:
    engine_id: str
    model: str
    region: str
    gpu: str
    deadline_s: float
    age_s: float  # since the engine was asked for, at the decision


@dataclass(frozen=True, slots=True)
class Decision:
    """One step's outcome. `plan` is what was applied (best effort when infeasible);
    `wanted` its first slot; `held` engines the guards kept from going, per key."""

    at: float
    status: RunStatus
    plan: Plan | None
    wanted: Mapping[Key, int]
    now: Mapping[Key, int]  # engines counted as allocated (starting or serving)
    starts: tuple[Start, ...] = ()
    drains: tuple[Drain, ...] = ()
    held: Mapping[Key, int] = field(default_factory=dict)
    shortfalls: tuple[Shortfall, ...] = ()
    error: str = ""
    left_out: tuple[str, ...] = ()  # engines reported failed
    methods: Mapping[DemandKey, str] = field(default_factory=dict)  # forecast method per series

    @property
    def changes(self) -> bool:
        return bool(self.starts or self.drains)


def decide(
    history: Mapping[DemandKey, Sequence[float]],
    engines: Sequence[EngineRecord],
    settings: Settings,
    now: float,
    last: Decision | None = None,
) -> Decision:
    """The actions for `engines` at `now` given `history`: per (model, region, class), prompt
    tokens per minute, oldest first, ending with the last whole minute before `now`."""
    counted = [e for e in engines if e.status in ("starting", "serving")]
    failed = [e for e in engines if e.status == "failed"]
    have: dict[Key, int] = defaultdict(int)
    for e in counted:
        have[e.key] += 1
    now_counts = {k: have.get(k, 0) for k in settings.keys}
    methods: dict[DemandKey, str] = {}
    try:
        inp = plan_input(history, counted, settings, now, methods)
    except ValueError as exc:
        return _hold(now, now_counts, f"planner input: {exc}", failed, methods, last)
    status: RunStatus = "ok"
    shortfalls: tuple[Shortfall, ...] = ()
    error = ""
    try:
        plan: Plan | None = solve(inp, settings.solver, settings.time_limit_s)
        if plan is not None:  # start-up gaps: demand no engine asked for now reaches in time
            shortfalls = plan.shortfalls
    except Infeasible as exc:
        status, shortfalls, error = "infeasible", exc.shortfalls, str(exc)
        plan = exc.best_effort
    except SolverError as exc:
        return _hold(now, now_counts, str(exc), failed, methods, last)
    if plan is not None:
        wanted = plan.first_slot()
    elif last is not None and last.plan is not None:
        wanted = _slot_now(last, now, settings)
    else:
        wanted = dict(now_counts)
    starts, drains, held = _guard(wanted, counted, failed, settings, now)
    return Decision(
        at=now, status=status, plan=plan if plan is not None or last is None else last.plan,
        wanted=wanted, now=now_counts, starts=starts, drains=drains, held=held,
        shortfalls=shortfalls, error=error, left_out=tuple(e.id for e in failed),
        methods=methods,
    )  # fmt: skip


def plan_input(
    history: Mapping[DemandKey, Sequence[float]],
    engines: Sequence[EngineRecord],
    settings: Settings,
    now: float,
    methods: dict[DemandKey, str] | None = None,
) -> PlanInput:
    """The program for `history` and the engines counted as allocated."""
    s = settings
    cfg = ForecastConfig(quantile=s.quantile)
    horizon = s.slots * s.slot_minutes
    models, regions = set(s.models), set(s.regions)
    deadline = deadline_slots(s.batch_deadline_min, s.slot_minutes)
    slots: dict[DemandKey, Sequence[SlotForecast]] = {}
    for key, series in sorted(history.items()):
        model, region, _ = key
        if model not in models or region not in regions or not series:
            continue
        f = forecast(series, horizon, cfg)
        if methods is not None:
            methods[key] = f.method
        slots[key] = f.slots(s.slot_minutes)
    # Series per minute; batch due within the horizon.
    interactive, batch = program_demand(slots, s.slot_minutes, deadline, 60.0, s.slots - 1)
    known = {(e.model, e.gpu) for e in s.engines}
    current = tuple(
        RunningEngine(e.model, e.region, e.gpu, max(0.0, (now - e.started_at) / 60))
        for e in engines
        if (e.model, e.gpu) in known and e.region in regions
    )
    return PlanInput(
        regions=s.regions, gpus=s.gpus, engines=s.engines, slots=s.slots,
        slot_minutes=float(s.slot_minutes), interactive=interactive, batch=batch,
        quotas=s.quotas, current=current, headroom=s.headroom, min_engines=s.min_engines,
    )  # fmt: skip


def _guard(
    wanted: Mapping[Key, int],
    counted: Sequence[EngineRecord],
    failed: Sequence[EngineRecord],
    s: Settings,
    now: float,
) -> tuple[tuple[Start, ...], tuple[Drain, ...], dict[Key, int]]:
    by_key: dict[Key, list[EngineRecord]] = defaultdict(list)
    for e in counted:
        by_key[e.key].append(e)
    recently_failed = {e.key for e in failed if now - e.started_at < s.retry_after_s}
    starts, drains, held = [], [], {}
    for key in s.keys:
        want, mine = wanted.get(key, 0), by_key.get(key, [])
        if want > len(mine):
            if key in recently_failed:
                held[key] = want - len(mine)
                continue
            starts.append(Start(*key, count=want - len(mine)))
        elif want < len(mine):
            old = [e for e in mine if now - e.started_at >= s.min_lifetime_s]
            # Engines still starting first (nothing runs there yet), then the youngest.
            old.sort(key=lambda e: (e.status != "starting", -e.started_at, e.id))
            go = old[: len(mine) - want]
            if len(go) < len(mine) - want:
                held[key] = len(mine) - want - len(go)
            drains += [Drain(e.id, *key, s.drain_deadline_s, now - e.started_at) for e in go]
    return tuple(starts), tuple(drains), held


def _slot_now(last: Decision, now: float, s: Settings) -> dict[Key, int]:
    """The last good plan's counts for the slot `now` falls in."""
    assert last.plan is not None
    i = min(int((now - last.at) // (s.slot_minutes * 60)), s.slots - 1)
    return {(a.model, a.region, a.gpu): a.engines[max(i, 0)] for a in last.plan.allocations}


def _hold(
    now: float,
    counts: Mapping[Key, int],
    error: str,
    failed: Sequence[EngineRecord],
    methods: Mapping[DemandKey, str],
    last: Decision | None,
) -> Decision:
    return Decision(at=now, status="error", plan=last.plan if last else None, wanted=dict(counts),
                    now=counts, error=error, left_out=tuple(e.id for e in failed),
                    methods=methods)  # fmt: skip


# --- The loop.


class DemandSource(Protocol):
    async def history(self, minutes: int, now: float) -> Mapping[DemandKey, Sequence[float]]:
        """Prompt tokens per minute per (model, region, class): the `minutes` whole minutes
        before the one `now` falls in, oldest first."""
        ...


class Actuator(Protocol):
    """What applies a decision (planner.actuators)."""

    kind: str

    async def engines(self) -> list[EngineRecord]:
        """The engines it can act on: starting, serving or draining."""
        ...

    async def apply(self, decision: Decision) -> None:
        """Start and drain what `decision` says; returns before slow starts finish."""
        ...

    def on_failure(self, callback: Callable[[EngineRecord], None]) -> None:
        """Call `callback` with the engine (status "failed") when one fails to start."""
        ...

    async def close(self) -> None: ...


class Controller:
    """Runs `decide` every `interval_s` and applies it through `actuator`; keeps the last
    decision (`last`), the last good plan (`last_plan`) and the last error for the admin view
    and the metrics."""

    def __init__(
        self,
        settings: Settings,
        demand: DemandSource,
        actuator: Actuator,
        interval_s: float,
        clock: Callable[[], float] = time.time,
        on_decision: Callable[[Decision], Awaitable[None] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.demand = demand
        self.actuator = actuator
        self.interval_s = interval_s
        self.clock = clock
        self.on_decision = on_decision
        self.last: Decision | None = None
        self.last_plan: Plan | None = None  # the last feasible one
        self.last_error = ""
        self.runs = 0
        self.failed: list[EngineRecord] = []  # failed starts, kept for retry_after_s
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one step at a time, however it was started
        actuator.on_failure(self._failed)

    def _failed(self, e: EngineRecord) -> None:
        log.warning("planner_start_failed", engine=e.id, key="/".join(e.key), why=e.detail)
        self.failed.append(e)
        self._wake.set()

    async def step(self) -> Decision:
        """One run: read, decide, apply."""
        async with self._lock:
            return await self._step()

    async def _step(self) -> Decision:
        now = self.clock()
        history = await self.demand.history(self.settings.history_minutes, now)
        keep = self.settings.retry_after_s
        self.failed = [e for e in self.failed if now - e.started_at < keep]
        engines = [*await self.actuator.engines(), *self.failed]
        # The solver runs for up to its time limit: off the event loop, which keeps serving.
        d = await asyncio.to_thread(decide, history, engines, self.settings, now, self.last)
        self.runs += 1
        self.last = d
        self.last_error = d.error
        if d.status == "infeasible":
            log.warning("planner_infeasible", shortfalls=[x.detail for x in d.shortfalls],
                        applied="best-effort plan" if d.plan is not self.last_plan
                        else "last good plan")  # fmt: skip
        elif d.status == "error":
            log.error("planner_failed", error=d.error, fleet="left as it is")
        if d.status == "ok" and d.plan is not None:
            self.last_plan = d.plan
        if d.changes:
            log.info("planner_applied", status=d.status,
                     start=[f"{s.count} x {'/'.join(s.key)}" for s in d.starts],
                     drain=[x.engine_id for x in d.drains])  # fmt: skip
        await self.actuator.apply(d)
        if self.on_decision is not None:
            out = self.on_decision(d)
            if out is not None:
                await out
        return d

    async def run(self) -> None:
        """Step every `interval_s` until cancelled; a failed step is logged, not fatal."""
        while True:
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must outlive one bad step
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("planner_step_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
