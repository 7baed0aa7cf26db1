"""A scaling policy replayed on the cluster simulator: the fleet it asks for, and what it costs.

`Replay` drives an `engines.cluster.ClusterSim` whose frontend (the gateway's gate core, in the
benchmark) routes the trace's requests. Once a minute of virtual time it shows the policy the
fleet (engines asked for, with their ages, and the utilisation measured over the last minute)
and applies the counts it returns: engines asked for serve only after their type's start-up
time and are paid from the moment they are asked for; engines no longer wanted are cancelled
while still starting, or drained (they take nothing new and leave when idle).

What is measured comes from the simulator, never from the plan: GPU-hours from each engine's
life, SLO attainment and batch deadline misses from the jobs (a batch request misses when it
finishes after its deadline or not at all, whichever way the gate core feeds batch), scale-ups
and start-up GPU-minutes from the engines asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engines.cluster import ClusterSim, EngineSpec, Job
from engines.cluster_parts import SimulatedEngine
from planner.forecast import mape, smape
from planner.policies import FleetState, Policy, Series, Setting
from planner.problem import EngineType, Key, RunningEngine

DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class Slo:
    """A request of `model` meets its SLO when its first token comes within `ttft_s` and it
    ends within `ttft_s` + its output tokens x `tpot_s`."""

    ttft_s: float
    tpot_s: float

    def met(self, job: Job) -> bool:
        if job.first_token is None or job.finished is None:
            return False
        ttft = job.first_token - job.arrival
        return ttft <= self.ttft_s and (
            job.finished - job.arrival <= self.ttft_s + job.generated * self.tpot_s
        )


@dataclass(slots=True)
class Sample:
    """The fleet at one minute: GPUs allocated and serving per region, engines per series."""

    minute: int
    gpus: dict[str, int]
    serving_gpus: dict[str, int]
    engines: dict[Series, int]


@dataclass(slots=True)
class Replay:
    """One policy on one simulator. `spec(key, n)` names the engine to start for `key`;
    `on_add(spec)` runs as one is asked for (the benchmark gives the router its profile)."""

    sim: ClusterSim
    policy: Policy
    setting: Setting
    spec: Callable[[Key, int], EngineSpec]
    until_s: float  # no decisions after this (the end of the trace)
    sample_s: float = 10.0  # utilisation samples
    on_add: Callable[[EngineSpec], None] = lambda spec: None
    types: dict[tuple[str, str], EngineType] = field(init=False)
    keys: dict[str, Key] = field(init=False, default_factory=dict)  # engine id -> key
    added: list[SimulatedEngine] = field(init=False, default_factory=list)
    samples: list[Sample] = field(init=False, default_factory=list)
    decide_s: list[float] = field(init=False, default_factory=list)
    _busy: dict[Series, float] = field(init=False, default_factory=dict)
    _count: int = field(init=False, default=0)
    _serial: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.types = {(e.model, e.gpu): e for e in self.setting.engines}
        for e in self.sim.all_engines():
            self.keys[e.id] = (e.spec.model, e.spec.region, e.spec.gpu)
        self.sim.call_at(0.0, self._sample)
        self.sim.call_at(0.0, self._tick)

    # Timers ------------------------------------------------------------------------------

    def _sample(self, now: float) -> None:
        for e in self.sim.engines.values():
            if e.draining:
                continue
            s = (e.spec.model, e.spec.region)
            used = len(e.sched.running) + len(e.sched.waiting)
            self._busy[s] = self._busy.get(s, 0.0) + min(1.0, used / e.spec.max_num_seqs)
        self._count += 1
        if now + self.sample_s <= self.until_s:
            self.sim.call_at(now + self.sample_s, self._sample)

    def _tick(self, now: float) -> None:
        import time

        minute = round(now / 60)
        fleet = self.fleet(now)
        t0 = time.perf_counter()
        target = self.policy.decide(minute, fleet)
        self.decide_s.append(time.perf_counter() - t0)
        self.apply(target)
        self._record(minute)
        if now + 60 <= self.until_s:
            self.sim.call_at(now + 60, self._tick)

    def fleet(self, now: float) -> FleetState:
        """Engines asked for and not draining, and utilisation since the last call."""
        serving: dict[Series, int] = {}
        running = []
        for e in [*self.sim.engines.values(), *self.sim.starting.values()]:
            if e.draining:
                continue
            m, r, g = self.keys[e.id]
            running.append(RunningEngine(m, r, g, age_min=(now - e.asked_at) / 60))
            if e.id in self.sim.engines:
                serving[m, r] = serving.get((m, r), 0) + 1
        util = {}
        for s in self.setting.series:
            n = serving.get(s, 0)
            busy = self._busy.get(s, 0.0)
            util[s] = busy / (n * self._count) if n and self._count else (1.0 if busy else 0.0)
        self._busy, self._count = {}, 0
        return FleetState(now / 60, tuple(running), util)

    # Acting ------------------------------------------------------------------------------

    def apply(self, target: Mapping[Key, int]) -> None:
        """Start or stop engines until each key has its target (starting ones count)."""
        by_key: dict[Key, list[SimulatedEngine]] = {}
        for e in [*self.sim.engines.values(), *self.sim.starting.values()]:
            if not e.draining:
                by_key.setdefault(self.keys[e.id], []).append(e)
        for key, want in target.items():
            have = by_key.get(key, [])
            if want > len(have):
                e_type = self.types[key[0], key[2]]
                for _ in range(want - len(have)):
                    self._serial += 1
                    spec = self.spec(key, self._serial)
                    self.keys[spec.id] = key
                    self.on_add(spec)
                    self.added.append(self.sim.add_engine(spec, e_type.startup_min * 60))
            elif want < len(have):
                # Those still starting go first (youngest first), then the least busy.
                order = sorted(
                    have,
                    key=lambda e: (e.id in self.sim.engines, len(e.jobs), -e.asked_at),
                )
                for e in order[: len(have) - want]:
                    self.sim.drain_engine(e.id)

    def _record(self, minute: int) -> None:
        gpus: dict[str, int] = {}
        ready: dict[str, int] = {}
        engines: dict[Series, int] = {}
        for e in [*self.sim.engines.values(), *self.sim.starting.values()]:
            r = e.spec.region
            gpus[r] = gpus.get(r, 0) + e.gpus
            if e.id in self.sim.engines and not e.draining:
                ready[r] = ready.get(r, 0) + e.gpus
            if not e.draining:
                s = (e.spec.model, r)
                engines[s] = engines.get(s, 0) + 1
        self.samples.append(Sample(minute, gpus, ready, engines))


# Measures ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DayResult:
    day: int
    gpu_hours: float
    interactive: int
    slo_met: int
    batch: int
    batch_missed: int
    scale_ups: int
    startup_gpu_min: float

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / self.interactive if self.interactive else math.nan


def batch_missed(job: Job, deadline_s: float) -> bool:
    """Finished after its deadline, or not at all (expired in the gate core's batch queue,
    refused, or still unfinished when the run ended)."""
    return job.finished is None or job.finished > deadline_s


def engine_hours_by_day(engines: Sequence[SimulatedEngine], end_s: float, days: int) -> list[float]:
    """GPU-hours of `engines` in each day, each engine from asked-for to gone (or `end_s`)."""
    out = [0.0] * days
    for e in engines:
        lo = e.asked_at
        hi = end_s if e.gone_at is None else min(e.gone_at, end_s)
        for d in range(days):
            a, b = max(lo, d * DAY_S), min(hi, (d + 1) * DAY_S)
            if b > a:
                out[d] += e.gpus * (b - a) / 3600
    return out


def by_day(
    jobs: Sequence[Job],
    batch: Sequence[bool],
    deadlines: Sequence[float],
    slos: Mapping[str, Slo],
    engines: Sequence[SimulatedEngine],
    added: Sequence[SimulatedEngine],
    days: int,
    end_s: float,
) -> list[DayResult]:
    """Per day of arrival (requests) or of being asked for (engines)."""
    hours = engine_hours_by_day(engines, end_s, days)
    inter = [0] * days
    met = [0] * days
    nb = [0] * days
    missed = [0] * days
    for job, is_batch, deadline in zip(jobs, batch, deadlines, strict=True):
        d = min(days - 1, int(job.arrival // DAY_S))
        if is_batch:
            nb[d] += 1
            missed[d] += batch_missed(job, deadline)
        else:
            inter[d] += 1
            met[d] += slos[job.model].met(job)
    ups = [0] * days
    startup = [0.0] * days
    for e in added:
        d = min(days - 1, int(e.asked_at // DAY_S))
        ups[d] += 1
        ready = e.ready_at if e.gone_at is None else min(e.ready_at, e.gone_at)
        startup[d] += e.gpus * (ready - e.asked_at) / 60
    return [
        DayResult(d, hours[d], inter[d], met[d], nb[d], missed[d], ups[d], startup[d])
        for d in range(days)
    ]


def forecast_accuracy(
    actual: Mapping[tuple[str, str, str], Sequence[float]],
    predicted: Mapping[int, Mapping[tuple[str, str, str], Sequence[float]]],
) -> dict[tuple[str, str, str], tuple[float, float]]:
    """sMAPE and MAPE per series of the forecasts made at each minute in `predicted` (the
    point forecast over its horizon) against what happened."""
    out = {}
    for key, series in actual.items():
        a: list[float] = []
        p: list[float] = []
        for t, fc in predicted.items():
            f = fc.get(key)
            if f is None:
                continue
            n = min(len(f), len(series) - t)
            a.extend(series[t : t + n])
            p.extend(f[:n])
        if a:
            out[key] = (smape(a, p), mape(a, p))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=float), q)) if len(values) else math.nan
