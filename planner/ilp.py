"""SageServe's integer program, over a horizon of slots, with start-up delays and quotas.

Variables, per (model, region, GPU type) and slot: `n` engines allocated (integer, paid from
the slot they are asked for), `ready` engines serving (integer), `up` / `down` the positive and
negative parts of the change from the slot before (linearised: `up >= n[s] - n[s-1]`, and the
objective pushes it down to the positive part). Engines are whole; a rounding cut (at least
ceil(demand / fastest engine) serve) tightens the relaxation. An engine serves in slot s only
if it has been allocated without a break since slot s - D, D its start-up in slots, so
`ready[s] <= n[t]` for every t in [s - D, s]: the oldest engines are the ones kept, and engines
running now serve from the slot their remaining start-up ends. Batch work `x` may go to any
allowed region and slot before its deadline. Capacity: sum over GPU types of ready x tokens/s
>= (1 + headroom) x interactive demand + the batch rate. Quotas bound the GPUs of each (region,
GPU type) in every slot.

Objective: GPU-hours x price, plus for every engine started its start-up GPU-hours (the waste
SageServe counts), plus churn for every engine added or removed.

Demand in the first slots, before any engine asked for now can serve, that the engines running
then cannot meet is no fault of the plan: a penalised slack (`late`, at most that gap, priced
above any engine) takes it, and the plan names it (`Plan.shortfalls`, kind "startup"). So the
program is infeasible only when a quota or a batch deadline binds; then an elastic copy
(shortfall variables on every demand) finds the least that must be missed and names the
binding constraint: `Infeasible`. Every solve stops at `time_limit_s` with the best plan found
so far (`Plan.optimal` False).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import pulp

from planner.problem import (
    Allocation,
    BatchAssignment,
    BatchDemand,
    EngineType,
    Infeasible,
    Key,
    Plan,
    PlanInput,
    Shortfall,
)

# "auto": HiGHS (highspy) when installed, CBC otherwise. On the 3 regions x 4 models x 2 GPU
# types x 12 slots program both reach the optimum; HiGHS's worst case was about half CBC's.
Solver = Literal["auto", "cbc", "highs"]

# Shortfalls below this many engines' worth are solver tolerance, not demand missed.
_NEGLIGIBLE = 1e-4


class SolverError(RuntimeError):
    """The solver found no solution within its time limit, or failed outright."""


def highs_available() -> bool:
    return bool(pulp.HiGHS(msg=False).available())


def solve(
    inp: PlanInput, solver: Solver = "auto", time_limit_s: float = 10.0, gap_rel: float = 1e-3
) -> Plan:
    """The cheapest plan that meets every demand (within `gap_rel` of the optimum); raises
    `Infeasible` when there is none, `SolverError` when the solver finds nothing in time."""
    if solver == "auto":
        solver = "highs" if highs_available() else "cbc"
    t0 = time.perf_counter()
    prog = _Program(inp, elastic=False)
    build_s = time.perf_counter() - t0
    if not prog.trivially_infeasible:
        status, solve_s = _run(prog.prob, solver, time_limit_s, gap_rel)
        if status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return prog.plan(solver, status == pulp.LpSolutionOptimal, solve_s, build_s)
        if status != pulp.LpSolutionInfeasible:
            raise SolverError(f"{solver}: {pulp.LpSolution[status]} within {time_limit_s} s")
    first_s = time.perf_counter() - t0  # building and solving the program found infeasible
    err = _explain(inp, solver, time_limit_s, gap_rel)
    err.first_solve_s = first_s
    raise err


def _run(
    prob: pulp.LpProblem, solver: Solver, time_limit_s: float, gap_rel: float
) -> tuple[int, float]:
    backend: Any
    if solver == "highs":
        backend = pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap_rel)
    else:
        # PuLP 3.x warns that its bundled CBC moves to a separate package in 4.0; pyproject pins
        # pulp below 4, where the bundled binary is the supported one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            backend = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel)
    t0 = time.perf_counter()
    try:
        prob.solve(backend)
    except pulp.PulpSolverError as e:
        raise SolverError(f"{solver}: {e}") from e
    if prob.status == pulp.LpStatusInfeasible:
        # CBC proving infeasibility in presolve leaves the solution "not found"; the status
        # says why.
        return pulp.LpSolutionInfeasible, time.perf_counter() - t0
    return int(prob.sol_status), time.perf_counter() - t0


def _explain(inp: PlanInput, solver: Solver, time_limit_s: float, gap_rel: float) -> Infeasible:
    t0 = time.perf_counter()
    prog = _Program(inp, elastic=True)
    build_s = time.perf_counter() - t0
    # Least missed first; then, with the miss held, the cheapest plan that misses it.
    prog.prob.setObjective(prog.missed)
    # No gap here: what is reported missing must be what has to be missed.
    status, solve_s = _run(prog.prob, solver, time_limit_s, 0.0)
    if status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise SolverError(f"{solver}: elastic program {pulp.LpSolution[status]}")
    least = float(pulp.value(prog.missed))
    shortfalls = prog.shortfalls()
    prog.prob += prog.missed <= least * (1 + 1e-6) + 1e-6, "hold_missed"
    prog.prob.setObjective(prog.cost)
    status, more_s = _run(prog.prob, solver, time_limit_s, gap_rel)
    if status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return Infeasible(shortfalls, None)
    best = prog.plan(solver, status == pulp.LpSolutionOptimal, solve_s + more_s, build_s)
    # Read again: the cheapest plan may miss the same amount elsewhere.
    return Infeasible(prog.shortfalls(), best)


@dataclass
class _Program:
    inp: PlanInput
    elastic: bool
    prob: pulp.LpProblem = field(init=False)
    trivially_infeasible: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        inp = self.inp
        self.prob = pulp.LpProblem("fairway_plan", pulp.LpMinimize)
        self.slots = range(inp.slots)
        self.types: dict[tuple[str, str], EngineType] = {(e.model, e.gpu): e for e in inp.engines}
        self.by_model: dict[str, list[EngineType]] = defaultdict(list)
        for e in inp.engines:
            self.by_model[e.model].append(e)
        self.keys: list[Key] = [(e.model, r, e.gpu) for e in inp.engines for r in inp.regions]
        self.current: dict[Key, int] = defaultdict(int)
        # Engines running now, by the minute their start-up ends (0: serving already).
        self.starting: dict[Key, list[tuple[float, int]]] = defaultdict(list)
        for c in inp.current:
            k = (c.model, c.region, c.gpu)
            self.current[k] += c.count
            left = max(0.0, self.types[c.model, c.gpu].startup_min - c.age_min)
            self.starting[k].append((left, c.count))
        self._variables()
        self._constraints()

    # Variables -------------------------------------------------------------------------

    def _variables(self) -> None:
        inp, add = self.inp, self.prob.add_variable
        self.n: dict[tuple[Key, int], pulp.LpVariable] = {}
        self.ready: dict[tuple[Key, int], pulp.LpVariable] = {}
        self.up: dict[tuple[Key, int], pulp.LpVariable] = {}
        self.down: dict[tuple[Key, int], pulp.LpVariable] = {}
        for i, k in enumerate(self.keys):
            m, r, g = k
            quota = inp.quotas.get((r, g))
            cap = None if quota is None else quota // self.types[m, g].gpus
            for s in self.slots:
                self.n[k, s] = add(f"n_{i}_{s}", 0, cap, cat=pulp.LpInteger)
                # Integer though implied by n (a minimum of integers): declared so, the
                # solvers branch on it and find good plans several times faster.
                self.ready[k, s] = add(f"ready_{i}_{s}", 0, cat=pulp.LpInteger)
                self.up[k, s] = add(f"up_{i}_{s}", 0)
                self.down[k, s] = add(f"down_{i}_{s}", 0)
        self.x: dict[tuple[str, str, int], pulp.LpVariable] = {}
        # Demand and capacity are counted in engines of the model's fastest type (`unit`
        # tokens/s): raw token counts (1e7 for a batch) leave the program badly scaled.
        self.unit = {m: max(e.tokens_per_s for e in ts) for m, ts in self.by_model.items()}
        for j, b in enumerate(inp.batch):
            for ri, r in enumerate(b.regions or inp.regions):
                for s in self._batch_slots(b):
                    # The slot's batch rate in units.
                    self.x[b.id, r, s] = add(f"x_{j}_{ri}_{s}", 0)
        self.short: dict[tuple[str, str, int], pulp.LpVariable] = {}
        self.late: dict[tuple[str, str, int], pulp.LpVariable] = {}
        self.unserved: dict[str, pulp.LpVariable] = {}
        if self.elastic:
            for mi, m in enumerate(self.by_model):
                for ri, r in enumerate(inp.regions):
                    for s in self.slots:
                        self.short[m, r, s] = add(f"short_{mi}_{ri}_{s}", 0)
            for j, b in enumerate(inp.batch):
                self.unserved[b.id] = add(f"unserved_{j}", 0, b.tokens / self._work(b.model))

    def _work(self, model: str) -> float:
        """Tokens one unit of capacity serves in a slot."""
        return self.unit[model] * self.inp.slot_minutes * 60

    def _batch_slots(self, b: BatchDemand) -> range:
        return range(b.release_slot, min(b.deadline_slot, self.inp.slots - 1) + 1)

    # Constraints and objective ---------------------------------------------------------

    def _constraints(self) -> None:
        inp, prob = self.inp, self.prob
        price = {g.name: g.cost_per_hour for g in inp.gpus}
        cost = []
        for k in self.keys:
            m, r, g = k
            e = self.types[m, g]
            d = inp.delay_slots(e)
            per_gpu = price[g] * e.gpus
            for s in self.slots:
                n, up, down = self.n[k, s], self.up[k, s], self.down[k, s]
                prev = self.n[k, s - 1] if s else self.current[k]
                prob += up >= n - prev
                prob += down >= prev - n
                for t in range(max(0, s - d), s + 1):
                    prob += self.ready[k, s] <= self.n[k, t]
                if s < d:
                    prob += self.ready[k, s] <= self.ready_now(k, s)
                cost.append(per_gpu * inp.slot_minutes / 60 * n)
                cost.append(per_gpu * inp.startup_weight * e.startup_min / 60 * up)
                cost.append(per_gpu * inp.churn_gpu_hours * (up + down))
        self.cost = pulp.lpSum(cost)
        batch_rate: dict[tuple[str, str, int], list[pulp.LpVariable]] = defaultdict(list)
        by_id = {b.id: b for b in inp.batch}
        for (bid, r, s), v in self.x.items():
            batch_rate[by_id[bid].model, r, s].append(v)
        missed = []
        # A unit of demand left to the start-up slack costs more than the dearest engine over
        # the whole horizon: the plan keeps every engine that can serve before it leaves any.
        late_price = (
            10
            * max(price[e.gpu] * e.gpus for e in inp.engines)
            * (inp.slots * inp.slot_minutes / 60)
        )
        late_cost = []
        for m, types in self.by_model.items():
            unit = self.unit[m]
            first = min(inp.delay_slots(e) for e in types)
            for r in inp.regions:
                demand = inp.interactive.get((m, r), (0.0,) * inp.slots)
                for s in self.slots:
                    need = (1 + inp.headroom) * demand[s] / unit
                    rate = batch_rate.get((m, r, s), [])
                    if need <= 0 and not rate:
                        continue
                    have = pulp.lpSum(
                        e.tokens_per_s / unit * self.ready[(m, r, e.gpu), s] for e in types
                    )
                    if self.elastic:
                        # Shortfalls are weighed in units, so every model's count alike.
                        have += self.short[m, r, s]
                        missed.append(self.short[m, r, s])
                    elif s < first and need > (now := self._ready_units(m, r, s)) + 1e-9:
                        # No engine asked for now serves yet: what those running then cannot
                        # give is left to the slack, never to a quota.
                        late = self.prob.add_variable(f"late_{len(self.late)}", 0, need - now)
                        self.late[m, r, s] = late
                        have += late
                        late_cost.append(late_price * late)
                    prob += have >= need + pulp.lpSum(rate)
                    # Engines are whole and none exceeds one unit, so at least ceil(need) of
                    # them serve: a rounding cut the relaxation lacks (it closes most of the
                    # gap between the LP bound and the integer optimum).
                    if need > 0 and not self.elastic and (m, r, s) not in self.late:
                        prob += pulp.lpSum(self.ready[(m, r, e.gpu), s] for e in types) >= (
                            math.ceil(need - 1e-9)
                        )
        for (r, g), quota in inp.quotas.items():
            for s in self.slots:
                used = [
                    self.types[m, g].gpus * self.n[(m, r, g), s]
                    for m in self.by_model
                    if (m, g) in self.types
                ]
                if used:
                    prob += pulp.lpSum(used) <= quota
        for (m, r), floor in inp.min_engines.items():
            for s in self.slots:
                prob += pulp.lpSum(self.n[(m, r, e.gpu), s] for e in self.by_model[m]) >= floor
        for b in inp.batch:
            done = pulp.lpSum(
                self.x[b.id, r, s] for r in b.regions or inp.regions for s in self._batch_slots(b)
            )
            due = b.deadline_slot < inp.slots
            work = b.tokens / self._work(b.model)
            if self.elastic:
                missed.append(self.unserved[b.id])
                done += self.unserved[b.id]
            elif not self._batch_slots(b):
                # Nothing can serve it: the constraint would name no variable.
                self.trivially_infeasible = self.trivially_infeasible or (due and work > 0)
                continue
            prob += (done == work) if due else (done <= work)
        self.missed = pulp.lpSum(missed)
        self.late_cost = pulp.lpSum(late_cost)
        prob.setObjective(self.cost + self.late_cost)

    def ready_now(self, k: Key, s: int) -> int:
        """Engines running now that serve through slot s with no new start."""
        start = s * self.inp.slot_minutes
        return sum(count for left, count in self.starting[k] if left <= start + 1e-9)

    def _ready_units(self, m: str, r: str, s: int) -> float:
        """What the engines running now can serve in slot s, in units."""
        return sum(
            e.tokens_per_s / self.unit[m] * self.ready_now((m, r, e.gpu), s)
            for e in self.by_model[m]
        )

    # Reading the solution --------------------------------------------------------------

    def plan(self, solver: Solver, optimal: bool, solve_s: float, build_s: float) -> Plan:
        inp = self.inp
        allocs = []
        gpu_hours = startup_gpu_hours = 0.0
        scale_ups = 0
        for k in self.keys:
            m, r, g = k
            e = self.types[m, g]
            d = inp.delay_slots(e)
            engines = tuple(round(self.n[k, s].value() or 0.0) for s in self.slots)
            ready, started = [], []
            for s in self.slots:
                window = [engines[t] for t in range(max(0, s - d), s + 1)]
                if s < d:
                    window.append(self.ready_now(k, s))
                ready.append(min(window))
                started.append(max(0, engines[s] - (engines[s - 1] if s else self.current[k])))
            allocs.append(Allocation(m, r, g, engines, tuple(ready), tuple(started)))
            gpu_hours += sum(engines) * e.gpus * inp.slot_minutes / 60
            scale_ups += sum(started)
            startup_gpu_hours += sum(started) * e.gpus * e.startup_min / 60
        model = {b.id: b.model for b in inp.batch}
        batch = tuple(
            BatchAssignment(bid, r, s, float(v.value() or 0.0) * self._work(model[bid]))
            for (bid, r, s), v in self.x.items()
            if (v.value() or 0.0) > 1e-9
        )
        return Plan(
            allocations=tuple(allocs),
            batch=batch,
            cost=float(pulp.value(self.cost) or 0.0),
            gpu_hours=gpu_hours,
            scale_ups=scale_ups,
            startup_gpu_hours=startup_gpu_hours,
            solver=solver,
            optimal=optimal,
            solve_s=solve_s,
            build_s=build_s,
            shortfalls=tuple(
                self._startup_shortfall(m, r, s, float(v.value() or 0.0) * self.unit[m])
                for (m, r, s), v in self.late.items()
                if (v.value() or 0.0) > _NEGLIGIBLE
            ),
        )

    def shortfalls(self) -> tuple[Shortfall, ...]:
        inp, out = self.inp, []
        for (m, r, s), v in self.short.items():
            if (v.value() or 0.0) <= _NEGLIGIBLE:
                continue
            miss = float(v.value() or 0.0) * self.unit[m]
            first = min(inp.delay_slots(e) for e in self.by_model[m])
            have = self._ready_units(m, r, s) * self.unit[m]
            need = (1 + inp.headroom) * inp.interactive.get((m, r), (0.0,) * inp.slots)[s]
            # Before any new engine can serve, only the running ones can; if even they would
            # do, it is the quota that forbids keeping them.
            if s < first and have < need:
                out.append(self._startup_shortfall(m, r, s, miss))
            else:
                detail = (
                    f"{m} in {r}, slot {s}: {miss:.0f} tokens/s short; GPU quota of {r} "
                    f"full ({self._quota_use(r, s)})"
                )
                out.append(Shortfall("quota", m, r, s, miss, detail))
        for b in inp.batch:
            work = b.tokens / self._work(b.model)
            if (self.unserved[b.id].value() or 0.0) <= min(_NEGLIGIBLE, 1e-3 * work):
                continue
            miss = float(self.unserved[b.id].value() or 0.0) * self._work(b.model)
            first = min(inp.delay_slots(e) for e in self.by_model[b.model])
            if not self._batch_slots(b):
                why = f"its window (slots {b.release_slot} to {b.deadline_slot}) is empty"
            elif b.deadline_slot < first:
                why = f"new engines serve only from slot {first}"
            else:
                regions = b.regions or inp.regions
                why = "GPU quotas full: " + "; ".join(
                    f"{r}: {self._quota_use(r, b.deadline_slot)}" for r in regions
                )
            detail = (
                f"batch {b.id}: {miss:.0f} of {b.tokens:.0f} {b.model} tokens miss the deadline "
                f"(slot {b.deadline_slot}): {why}"
            )
            out.append(Shortfall("deadline", b.model, None, b.deadline_slot, miss, detail))
        return tuple(out)

    def _startup_shortfall(self, m: str, r: str, s: int, miss: float) -> Shortfall:
        fastest = min(self.by_model[m], key=self.inp.delay_slots)
        have = self._ready_units(m, r, s) * self.unit[m]
        detail = (
            f"{m} in {r}, slot {s}: {miss:.0f} tokens/s short; engines asked for now serve "
            f"from slot {self.inp.delay_slots(fastest)} ({fastest.startup_min:g} min start-up "
            f"on {fastest.gpu}) and those running give {have:.0f} tokens/s"
        )
        return Shortfall("startup", m, r, s, miss, detail)

    def _quota_use(self, region: str, s: int) -> str:
        s = min(s, self.inp.slots - 1)
        parts = []
        for (r, g), quota in sorted(self.inp.quotas.items()):
            if r != region:
                continue
            used = sum(
                self.types[m, g].gpus * round(self.n[(m, r, g), s].value() or 0.0)
                for m in self.by_model
                if (m, g) in self.types
            )
            parts.append(f"{g} {used}/{quota} GPUs")
        return ", ".join(parts) or "no quota set"
