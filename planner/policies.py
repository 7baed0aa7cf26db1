"""Scaling policies: given the time, the demand seen so far and the fleet, engines to run.

One interface for the offline evaluation and a live controller: `decide(now_min, fleet)`
returns target engine counts per (model, region, GPU type), counting engines still starting.
It is called once a minute; each policy acts on its own period. Demand reaches a policy only
through a `Forecaster`, which is handed the minute `now_min` and may read nothing after it
(`PastForecaster`), except the oracle's, which knows the future by design.

- `reactive`: per (model, region), every minute, one engine more when measured utilisation is
  above 0.5 (more when it is far above), one fewer below 0.25; no forecast.
- `lt-i`: SageServe's long-term plan (the integer program on forecasts) re-solved every slot,
  its first slot applied as it is.
- `lt-u`: the same plan, applied only where measured utilisation agrees with its direction:
  no scale-up of a series that is idle (below 0.25), no scale-down of one that is busy
  (above 0.5).
- `lt-ua`: lt-u, plus an override checked every minute: when a series' demand over the last
  minutes exceeds the plan's forecast for the slot by `surprise`, it gets the engines that
  demand needs at once, of the type that starts fastest.
- `oracle`: the integer program on the true future demand, each slot sized for its busiest
  `smooth_min`-minute mean; the cheapest such plan of the future at the SLO attainment its
  smoothing keeps (the evaluation replays several widths and takes the cheapest that keeps
  reactive scaling's), not a bound on policies that also react within a slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from planner.forecast import (
    Forecast,
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
)

Series = tuple[str, str]  # (model, region)
POLICIES = ("reactive", "lt-i", "lt-u", "lt-ua", "oracle")


@dataclass(frozen=True, slots=True)
class FleetState:
    """The fleet as a policy sees it at `now_min`: engines asked for and not draining (with
    their age, so those still starting are known), and the utilisation of each series over
    the last minute (in-flight requests over the serving engines' slots, 0..1)."""

    now_min: float
    running: tuple[RunningEngine, ...]
    utilisation: Mapping[Series, float]

    def allocated(self, key: Key) -> int:
        return sum(r.count for r in self.running if (r.model, r.region, r.gpu) == key)


@dataclass(frozen=True, slots=True)
class Setting:
    """What every policy shares: the regions, GPU types and engine types (tokens/s at the
    SLO, start-up), quotas, a floor of engines per series, and the plan's shape."""

    regions: tuple[str, ...]
    gpus: tuple[GpuType, ...]
    engines: tuple[EngineType, ...]
    quotas: Mapping[tuple[str, str], int] = field(default_factory=dict)
    min_engines: int = 1
    slot_minutes: int = 15
    slots: int = 12
    headroom: float = 0.2
    solver: Solver = "auto"
    time_limit_s: float = 10.0  # per solve; the best plan found by then is kept

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.model for e in self.engines))

    @property
    def series(self) -> tuple[Series, ...]:
        return tuple((m, r) for m in self.models for r in self.regions)

    def engine_keys(self) -> tuple[Key, ...]:
        return tuple((e.model, r, e.gpu) for e in self.engines for r in self.regions)

    def cheapest(self, model: str) -> EngineType:
        """The engine type of `model` with the most tokens/s per unit of price."""
        price = {g.name: g.cost_per_hour for g in self.gpus}
        return max(
            (e for e in self.engines if e.model == model),
            key=lambda e: e.tokens_per_s / (price[e.gpu] * e.gpus),
        )

    def by_preference(self, model: str) -> list[EngineType]:
        """`model`'s engine types, cheapest per token first."""
        first = self.cheapest(model)
        return [first, *(e for e in self.engines if e.model == model and e is not first)]


class Forecaster(Protocol):
    """Per-slot demand (tokens/s) of every (model, region, class) from minute `now_min` on,
    made from what was known before `now_min`."""

    def slots(
        self, now_min: int, slot_minutes: int, slots: int
    ) -> Mapping[tuple[str, str, str], tuple[SlotForecast, ...]]: ...


class Policy(Protocol):
    name: str

    def decide(self, now_min: int, fleet: FleetState) -> dict[Key, int]: ...


# Forecasters ------------------------------------------------------------------------------


class PastForecaster:
    """Forecasts from per-minute series (tokens/s) of which only the minutes before `now_min`
    are read: ARIMA with its fallbacks (`planner.forecast`). Interactive series are forecast
    with `interactive`, batch series with `batch` (the cheaper fallbacks by default: batch
    waits, so its forecast only shapes where idle capacity goes). Forecasts are cached per
    minute, so policies planning at the same minutes share them."""

    def __init__(
        self,
        series: Mapping[tuple[str, str, str], Sequence[float]],
        interactive: ForecastConfig | None = None,
        batch: ForecastConfig | None = None,
    ) -> None:
        self.series = series
        interactive = interactive or ForecastConfig()
        self.configs = {
            "interactive": interactive,
            # min_history past any trace: the seasonal-naive and level fallbacks only.
            "batch": batch or replace(interactive, min_history=10**9),
        }
        self.cache: dict[tuple[int, int], dict[tuple[str, str, str], Forecast]] = {}

    def forecasts(self, now_min: int, horizon: int) -> dict[tuple[str, str, str], Forecast]:
        got = self.cache.get((now_min, horizon))
        if got is None:
            got = {
                k: forecast(s[:now_min], horizon, self.configs[k[2]])
                for k, s in self.series.items()
            }
            self.cache[now_min, horizon] = got
        return got

    def slots(
        self, now_min: int, slot_minutes: int, slots: int
    ) -> dict[tuple[str, str, str], tuple[SlotForecast, ...]]:
        fc = self.forecasts(now_min, slot_minutes * slots)
        return {k: f.slots(slot_minutes) for k, f in fc.items()}


class TrueFuture:
    """The oracle's forecaster: the series themselves from `now_min` on. A slot's upper value
    is its busiest `smooth_min`-minute mean (queues absorb shorter swings: the per-minute
    counts of a few requests a minute are mostly Poisson noise), its point the slot's mean."""

    def __init__(
        self, series: Mapping[tuple[str, str, str], Sequence[float]], smooth_min: int = 5
    ) -> None:
        self.series = series
        self.smooth_min = smooth_min

    def slots(
        self, now_min: int, slot_minutes: int, slots: int
    ) -> dict[tuple[str, str, str], tuple[SlotForecast, ...]]:
        out = {}
        w = self.smooth_min
        span = slot_minutes * slots
        for k, s in self.series.items():
            future = list(s[now_min : now_min + span + w - 1])
            future += [future[-1] if future else 0.0] * (span + w - 1 - len(future))
            smooth = [sum(future[i : i + w]) / w for i in range(span)]
            out[k] = tuple(
                SlotForecast(sum(future[i : i + slot_minutes]) / slot_minutes,
                             max(smooth[i : i + slot_minutes]))
                for i in range(0, span, slot_minutes)
            )  # fmt: skip
        return out


# Policies ---------------------------------------------------------------------------------


class Reactive:
    """Thresholds on measured utilisation, per (model, region), checked every minute."""

    name = "reactive"

    def __init__(self, setting: Setting, up: float = 0.5, down: float = 0.25) -> None:
        self.setting = setting
        self.up, self.down = up, down

    def decide(self, now_min: int, fleet: FleetState) -> dict[Key, int]:
        s = self.setting
        target = {k: fleet.allocated(k) for k in s.engine_keys()}
        for m, r in s.series:
            types = s.by_preference(m)
            keys = [(m, r, e.gpu) for e in types]
            n = sum(target[k] for k in keys)
            serving = sum(
                c.count
                for c in fleet.running
                if (c.model, c.region) == (m, r) and c.age_min >= _startup(types, c.gpu)
            )
            u = fleet.utilisation.get((m, r), 0.0)
            load = u * max(serving, 1)  # engines' worth of work
            if u > self.up and load / n > self.up:
                # Enough engines that the load would sit at the threshold: at least one more.
                _grow(target, keys, types, s, r, max(n + 1, math.ceil(load / self.up)) - n)
            elif u < self.down and n > s.min_engines and serving == n:
                _shrink(target, keys[::-1], 1)  # the dearest type goes first
        return target


def _startup(types: Sequence[EngineType], gpu: str) -> float:
    return next(e.startup_min for e in types if e.gpu == gpu)


def _gpus_used(target: Mapping[Key, int], setting: Setting, region: str, gpu: str) -> int:
    per = {(e.model, e.gpu): e.gpus for e in setting.engines}
    return sum(n * per[m, g] for (m, r, g), n in target.items() if r == region and g == gpu)


def _grow(
    target: dict[Key, int],
    keys: Sequence[Key],
    types: Sequence[EngineType],
    setting: Setting,
    region: str,
    more: int,
) -> None:
    """Add `more` engines, of the cheapest type whose quota has room."""
    for _ in range(more):
        for k, e in zip(keys, types, strict=True):
            quota = setting.quotas.get((region, e.gpu))
            if quota is None or _gpus_used(target, setting, region, e.gpu) + e.gpus <= quota:
                target[k] += 1
                break


def _shrink(target: dict[Key, int], keys: Sequence[Key], fewer: int) -> None:
    for _ in range(fewer):
        for k in keys:
            if target[k] > 0:
                target[k] -= 1
                break


class LongTerm:
    """The integer program on forecasts, re-solved every slot: lt-i, lt-u or lt-ua by the
    gates given (see the module docstring)."""

    def __init__(
        self,
        name: str,
        setting: Setting,
        forecaster: Forecaster,
        *,
        gated: bool = False,
        recent: Callable[[int], Mapping[Series, float]] | None = None,
        surprise: float = 1.5,
        up: float = 0.5,
        down: float = 0.25,
        batch_deadline_min: float = 60.0,
    ) -> None:
        self.name = name
        self.setting = setting
        self.forecaster = forecaster
        self.gated = gated
        # lt-ua: the mean interactive demand (tokens/s) of each series over the last minutes.
        self.recent = recent
        self.surprise = surprise
        self.up, self.down = up, down
        # Batch due within the shortest deadline the workload gives, as the controller counts it.
        self.batch_deadline_slots = deadline_slots(batch_deadline_min, setting.slot_minutes)
        self.target: dict[Key, int] = {}
        self.plan: Plan | None = None
        self.slot_upper: dict[Series, float] = {}
        # Wall time of each program (the first solve of every plan), and apart from it that of
        # the elastic copy an infeasible one is solved again as; `solver_s` is the solver's
        # part of `solve_s` (PuLP's building of the program left out).
        self.solve_s: list[float] = []
        self.solver_s: list[float] = []
        self.elastic_s: list[float] = []
        self.infeasible = 0
        self.failed = 0  # no plan within the time limit: the last one stays
        self.not_optimal = 0  # plans cut by the time limit
        self.startup_short = 0  # plans with demand in their first slots that no engine meets
        self.overrides = 0

    def decide(self, now_min: int, fleet: FleetState) -> dict[Key, int]:
        s = self.setting
        if not self.target:
            self.target = {k: fleet.allocated(k) for k in s.engine_keys()}
        if now_min % s.slot_minutes == 0:
            plan = self._solve(now_min, fleet)
            if plan is not None:
                self.plan = plan
                wanted = plan.first_slot()
                for k in s.engine_keys():
                    now, want = fleet.allocated(k), wanted.get(k, 0)
                    u = fleet.utilisation.get((k[0], k[1]), 0.0)
                    if self.gated and (
                        (want > now and u < self.down) or (want < now and u > self.up)
                    ):
                        want = now
                    self.target[k] = want
        else:
            # Between plans, engines that left (a failed start, none here) are not replaced.
            for k in s.engine_keys():
                self.target.setdefault(k, fleet.allocated(k))
        if self.recent is not None:
            self._override(now_min, fleet)
        return dict(self.target)

    def _override(self, now_min: int, fleet: FleetState) -> None:
        assert self.recent is not None
        s = self.setting
        for (m, r), demand in self.recent(now_min).items():
            expected = self.slot_upper.get((m, r), 0.0)
            if demand <= self.surprise * expected:
                continue
            # A surprise is served soonest by the type that starts fastest, whatever its price.
            types = sorted(s.by_preference(m), key=lambda e: e.startup_min)
            keys = [(m, r, e.gpu) for e in types]
            have = sum(
                self.target.get(k, 0) * e.tokens_per_s for k, e in zip(keys, types, strict=True)
            )
            need = (1 + s.headroom) * demand
            if have >= need:
                continue
            more = math.ceil((need - have) / types[0].tokens_per_s)
            _grow(self.target, keys, types, s, r, more)
            self.overrides += 1

    def _solve(self, now_min: int, fleet: FleetState) -> Plan | None:
        s = self.setting
        fc = self.forecaster.slots(now_min, s.slot_minutes, s.slots)
        for (m, r, cls), per_slot in fc.items():
            if cls == "interactive":
                self.slot_upper[m, r] = per_slot[0].upper
        # Forecasts per second.
        interactive, batch = program_demand(
            fc, s.slot_minutes, self.batch_deadline_slots, 1.0, s.slots - 1
        )
        inp = PlanInput(
            regions=s.regions,
            gpus=s.gpus,
            engines=s.engines,
            slots=s.slots,
            slot_minutes=float(s.slot_minutes),
            interactive=interactive,
            batch=batch,
            quotas=s.quotas,
            current=fleet.running,
            headroom=s.headroom,
            min_engines={k: s.min_engines for k in s.series},
        )
        plan: Plan | None
        try:
            plan = solve(inp, solver=s.solver, time_limit_s=s.time_limit_s)
            self.solve_s.append(plan.build_s + plan.solve_s)
            self.solver_s.append(plan.solve_s)
        except Infeasible as e:
            self.infeasible += 1
            plan = e.best_effort
            self.solve_s.append(e.first_solve_s)
            self.solver_s.append(e.first_solve_s)  # the building included: not apart here
            if plan is not None:
                self.elastic_s.append(plan.build_s + plan.solve_s)
        except SolverError:
            self.failed += 1
            return None
        if plan is not None:
            self.not_optimal += not plan.optimal
            self.startup_short += any(x.kind == "startup" for x in plan.shortfalls)
        return plan


def build(
    name: str,
    setting: Setting,
    past: Forecaster,
    future: Forecaster,
    recent: Callable[[int], Mapping[Series, float]],
    surprise: float = 1.5,
) -> Reactive | LongTerm:
    """The policy called `name` (one of `POLICIES`); `surprise` is lt-ua's override threshold
    (recent demand over the slot's forecast upper quantile)."""
    if name == "reactive":
        return Reactive(setting)
    if name == "lt-i":
        return LongTerm(name, setting, past)
    if name == "lt-u":
        return LongTerm(name, setting, past, gated=True)
    if name == "lt-ua":
        return LongTerm(name, setting, past, gated=True, recent=recent, surprise=surprise)
    if name == "oracle":
        return LongTerm(name, setting, future)
    raise KeyError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
