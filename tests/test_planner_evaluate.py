"""The planner's evaluation: fleet changes in the cluster simulator, the scaling policies on
small traces, forecasts and plans that see only the past, and batch deadline misses."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from engines.cluster import ClusterSim, EngineSpec, Job, RouteOnArrival
from engines.cluster_parts import SimulatedEngine
from engines.perf_model import PerfModel
from gateway.config.schema import parse
from gateway.routing.policies import LeastOutstanding
from gateway.simulate import GateFrontend, SimRequest, request_info
from planner import evaluate as ev
from planner.capacity import RequestShape, capacity_at_slo
from planner.policies import (
    FleetState,
    LongTerm,
    PastForecaster,
    Reactive,
    Setting,
    TrueFuture,
    build,
)
from planner.problem import EngineType, GpuType, Key, RunningEngine

MODEL = "llama-3.1-8b"
KEY: Key = (MODEL, "r", "A100")


def first_engine_router(job: Job, engines: list[SimulatedEngine]) -> str:
    return min(engines, key=lambda e: (len(e.jobs), e.id)).id


def route_on_arrival(specs: list[EngineSpec], coalesce: bool = False) -> ClusterSim:
    front = RouteOnArrival(first_engine_router)
    sim = ClusterSim(specs, front, coalesce=coalesce)
    front.sim = sim
    return sim


# Fleet changes in the simulator -----------------------------------------------------------


def test_an_engine_asked_for_serves_only_after_its_start_up_and_is_paid_from_the_ask() -> None:
    sim = route_on_arrival([EngineSpec("e0", "r", "m")])
    late = [Job("a", 10.0, "m", 100, 30000), Job("b", 130.0, "m", 100, 50)]
    sim.call_at(5.0, lambda now: sim.add_engine(EngineSpec("e1", "r", "m"), startup_s=120.0))
    sim.run(late)
    e1 = next(e for e in sim.all_engines() if e.id == "e1")
    assert (e1.asked_at, e1.ready_at) == (5.0, 125.0)
    assert late[0].engine == "e0"  # e1 was still starting at t = 10
    assert late[1].engine == "e1"  # serving by t = 130, and idle where e0 is busy
    # Nothing left them: GPU-hours run from the ask to now for both.
    assert sim.gpu_hours() == pytest.approx((sim.now + sim.now - 5.0) / 3600)


def test_a_draining_engine_takes_nothing_new_and_leaves_when_idle() -> None:
    specs = [EngineSpec("e0", "r", "m"), EngineSpec("e1", "r", "m", tp=2)]
    sim = route_on_arrival(specs)
    jobs = [Job("long", 0.0, "m", 100, 400), Job("x", 1.0, "m", 100, 10)]
    jobs += [Job(f"after{i}", 2.0 + i, "m", 100, 10) for i in range(5)]
    sim.call_at(0.5, lambda now: sim.drain_engine("e0"))
    sim.run(jobs)
    assert jobs[0].engine == "e0"
    assert all(j.engine == "e1" for j in jobs[1:])
    (gone,) = sim.retired
    assert gone.id == "e0" and gone.gone_at == jobs[0].finished
    assert "e0" not in sim.engines and [e.id for e in sim.engines_of("m")] == ["e1"]
    # GPUs x time from asked-for to gone, summed: e0 (1 GPU) until it left, e1 (2) until now.
    assert sim.gpu_hours() == pytest.approx((jobs[0].finished + 2 * sim.now) / 3600)
    # A starting engine that is drained is cancelled, paid until then.
    sim.add_engine(EngineSpec("e2", "r", "m"), startup_s=60.0)
    sim.drain_engine("e2")
    assert sim.retired[-1].id == "e2" and sim.retired[-1].gpu_seconds(sim.now + 99) == 0.0


def test_the_gate_core_follows_joins_and_leaves() -> None:
    cfg = parse({
        "tenants": {"t": {"weight": 1.0}},
        "engines": {"r": {MODEL: [{"id": "e0", "kind": "sim", "gpu": "A100", "max_running": 1}]}},
    })  # fmt: skip
    front = GateFrontend(cfg, LeastOutstanding(), oit=False)
    sim = ClusterSim([EngineSpec("e0", "r", MODEL, gpu="A100", max_num_seqs=1)], front)
    front.sim = sim
    jobs = [
        Job(f"j{i}", 0.1 * i, MODEL, 200, 300,
            SimRequest(request_info(f"j{i}", "t", "default", MODEL, 200, 0.1 * i)))
        for i in range(2)
    ]  # fmt: skip
    spec = EngineSpec("e1", "r", MODEL, gpu="A100", max_num_seqs=1)
    sim.call_at(0.0, lambda now: sim.add_engine(spec, startup_s=2.0))
    sim.call_at(2.5, lambda now: sim.drain_engine("e0"))
    sim.run(jobs)
    # The second request waited in the gateway's queue until e1 had started.
    assert jobs[1].engine == "e1" and jobs[1].started == pytest.approx(2.0)
    assert all(j.finished is not None for j in jobs)
    assert [e.id for e in sim.retired] == ["e0"]
    assert "e0" not in front.core.ledger.loads and "e1" in front.core.ledger.loads


def test_coalesced_decode_runs_give_the_same_times_as_stepping_token_by_token() -> None:
    rng = random.Random(3)
    arrivals = sorted(rng.uniform(0, 30) for _ in range(300))
    sizes = [(rng.randint(20, 3000), rng.randint(1, 400)) for _ in arrivals]
    runs = []
    for coalesce in (False, True):
        jobs = [
            Job(str(i), t, "m", p, o)
            for i, (t, (p, o)) in enumerate(zip(arrivals, sizes, strict=True))
        ]
        specs = [EngineSpec(f"e{i}", "r", "m", max_num_seqs=8) for i in range(3)]
        sim = route_on_arrival(specs, coalesce=coalesce)
        sim.run(jobs)
        runs.append((jobs, sum(e.steps for e in sim.engines.values())))
    (exact, steps), (fast, coalesced_steps) = runs
    assert steps == coalesced_steps
    for a, b in zip(exact, fast, strict=True):
        assert (a.engine, a.generated) == (b.engine, b.generated)
        assert b.first_token == pytest.approx(a.first_token, abs=1e-9)
        assert b.finished == pytest.approx(a.finished, abs=1e-9)


# Policies on small traces -----------------------------------------------------------------

SHAPE = RequestShape(1000.0, 200.0)


def setting(startup_min: float = 2.0, slot_minutes: int = 5, slots: int = 6) -> Setting:
    cap = capacity_at_slo(PerfModel.named("A100", MODEL), SHAPE, 0.05, 1)
    e = EngineType(MODEL, "A100", 1, cap.prompt_tokens_per_s, startup_min)
    return Setting(("r",), (GpuType("A100", 1.8),), (e,), slot_minutes=slot_minutes,
                   slots=slots, solver="cbc")  # fmt: skip


def step_jobs(minutes: int, rate: tuple[float, float], at_min: int, seed: int = 1) -> list[Job]:
    """Poisson arrivals at rate[0] per second, then rate[1] from `at_min` on."""
    return poisson_jobs(minutes, lambda t: rate[0] if t < at_min * 60 else rate[1], seed)


def poisson_jobs(minutes: int, rate: Callable[[float], float], seed: int = 1) -> list[Job]:
    """Arrivals of a Poisson process of `rate(t)` per second (thinned from 2 per second)."""
    rng = random.Random(seed)
    jobs, t = [], 0.0
    while (t := t + rng.expovariate(2.0)) < minutes * 60:
        if rng.random() * 2.0 >= rate(t):
            continue
        i = len(jobs)
        info = replace(request_info(f"j{i}", "t", "default", MODEL, 1000, t),
                       preferred_regions=("r",))  # fmt: skip
        jobs.append(Job(f"j{i}", t, MODEL, 1000, 200, SimRequest(info)))
    return jobs


def series_of(jobs: list[Job], minutes: int) -> dict[tuple[str, str, str], list[float]]:
    per = [0.0] * minutes
    for j in jobs:
        per[int(j.arrival // 60)] += j.prompt_tokens / 60
    return {(MODEL, "r", "interactive"): per, (MODEL, "r", "batch"): [0.0] * minutes}


@dataclass
class Replayed:
    rep: ev.Replay
    jobs: list[Job]

    @property
    def sim(self) -> ClusterSim:
        return self.rep.sim

    @property
    def added(self) -> list[SimulatedEngine]:
        return self.rep.added

    @property
    def samples(self) -> list[ev.Sample]:
        return self.rep.samples


def replay(policy_name: str, jobs: list[Job], minutes: int, st: Setting) -> Replayed:
    cfg = parse({
        "tenants": {"t": {"weight": 1.0}},
        "engines": {"r": {MODEL: [{"id": "i0", "kind": "sim", "gpu": "A100", "max_running": 1}]}},
    })  # fmt: skip
    front = GateFrontend(cfg, LeastOutstanding(), oit=False)
    sim = ClusterSim([EngineSpec("i0", "r", MODEL, gpu="A100", max_num_seqs=1)], front,
                     coalesce=True)  # fmt: skip
    front.sim = sim
    series = series_of(jobs, minutes)
    policy = build(policy_name, st, PastForecaster(series), TrueFuture(series), lambda m: {})

    def spec(key: Key, n: int) -> EngineSpec:
        return EngineSpec(f"e{n}", key[1], key[0], gpu=key[2], max_num_seqs=1)

    rep = ev.Replay(sim, policy, st, spec, until_s=minutes * 60 - 60)
    fresh = [replace(j, info=SimRequest(j.info.info)) for j in jobs]
    sim.run(fresh, until=minutes * 60 + 600)
    return Replayed(rep, fresh)


def engines_at(rep: Replayed, minute: int) -> int:
    return next(s.engines.get((MODEL, "r"), 0) for s in rep.samples if s.minute == minute)


def test_reactive_scales_up_under_a_step_in_demand_and_back_down() -> None:
    st = setting()
    jobs = step_jobs(40, (0.1, 1.5), at_min=10)
    rep = replay("reactive", jobs, 40, st)
    assert engines_at(rep, 9) == 1
    assert max(s.engines[MODEL, "r"] for s in rep.samples if s.minute >= 10) >= 3
    assert len(rep.added) >= 2
    # Pure thresholds: above 0.5 grows, below 0.25 shrinks (never under the floor).
    pol = Reactive(st)
    running = (RunningEngine(MODEL, "r", "A100", 60.0, 4),)
    assert pol.decide(0, FleetState(0, running, {(MODEL, "r"): 0.9}))[KEY] >= 5
    assert pol.decide(0, FleetState(0, running, {(MODEL, "r"): 0.1}))[KEY] == 3
    assert pol.decide(0, FleetState(0, running, {(MODEL, "r"): 0.4}))[KEY] == 4


def ramp(minutes: int) -> dict[tuple[str, str, str], list[float]]:
    # Prompt tokens/s rising steadily, with a little noise: ARIMA extrapolates it.
    rng = random.Random(5)
    inter = [max(0.0, 50.0 + 12.0 * m + rng.gauss(0, 20)) for m in range(minutes)]
    return {(MODEL, "r", "interactive"): inter, (MODEL, "r", "batch"): [0.0] * minutes}


def test_lt_i_asks_for_engines_ahead_of_a_forecastable_ramp() -> None:
    st = setting(startup_min=10.0)
    series = ramp(400)
    pol = LongTerm("lt-i", st, PastForecaster(series))
    cap = st.engines[0].tokens_per_s
    now = 300
    running = (RunningEngine(MODEL, "r", "A100", 60.0, math.ceil(1.2 * series[KEY[0], "r",
               "interactive"][now - 1] / cap)),)  # fmt: skip
    target = pol.decide(now, FleetState(now, running, {(MODEL, "r"): 0.8}))
    # What the demand of the last minute needs, and what the ramp needs when engines asked
    # for now can serve (10 minutes later): the plan asks for the latter.
    now_need = running[0].count
    later_need = math.ceil(1.2 * series[MODEL, "r", "interactive"][now + 15] / cap)
    assert later_need > now_need
    assert target[KEY] >= later_need - 1 > now_need - 1
    assert target[KEY] > now_need


def test_the_oracle_uses_no_more_gpu_hours_than_lt_i() -> None:
    st = setting(startup_min=4.0)
    minutes = 150
    # A day's rise and fall in two and a half hours: the forecasts see it coming only partly.
    jobs = poisson_jobs(minutes, lambda t: 0.25 + 0.9 * math.sin(math.pi * t / (minutes * 60)))
    slos = {MODEL: ev.Slo(ttft_s=5.0, tpot_s=0.05)}
    got = {}
    for name in ("lt-i", "oracle"):
        rep = replay(name, jobs, minutes, st)
        done = rep.sim.all_engines()
        (day,) = ev.by_day(rep.jobs, [False] * len(jobs), [math.inf] * len(jobs), slos, done,
                           rep.added, 1, minutes * 60)  # fmt: skip
        got[name] = day
    assert got["oracle"].scale_ups > 0 and got["lt-i"].scale_ups > 0
    assert 0 < got["oracle"].gpu_hours <= got["lt-i"].gpu_hours
    assert got["oracle"].slo_attainment > 0.95


def test_forecasts_and_decisions_do_not_see_the_future() -> None:
    st = setting(startup_min=5.0)
    base = ramp(300)
    changed = {k: list(v) for k, v in base.items()}
    cut = 200
    changed[MODEL, "r", "interactive"][cut:] = [10 * v for v in changed[MODEL, "r",
                                                "interactive"][cut:]]  # fmt: skip
    a, b = PastForecaster(base), PastForecaster(changed)
    for k, fa in a.forecasts(cut, 30).items():
        fb = b.forecasts(cut, 30)[k]
        assert (fa.method, fa.point, fa.upper) == (fb.method, fb.point, fb.upper)
    later = a.forecasts(cut + 30, 30)[MODEL, "r", "interactive"]
    assert later.point != b.forecasts(cut + 30, 30)[MODEL, "r", "interactive"].point
    pa, pb = LongTerm("lt-i", st, a), LongTerm("lt-i", st, b)
    running = (RunningEngine(MODEL, "r", "A100", 60.0, 3),)
    for minute in range(cut - 20, cut + 1, 5):
        fleet = FleetState(minute, running, {(MODEL, "r"): 0.5})
        assert pa.decide(minute, fleet) == pb.decide(minute, fleet)
    # The oracle is the one that does see it.
    fa, fb = TrueFuture(base).slots(cut - 10, 5, 6), TrueFuture(changed).slots(cut - 10, 5, 6)
    assert fa != fb


def test_batch_misses_are_counted_from_the_jobs() -> None:
    sim = route_on_arrival([EngineSpec("e0", "r", "m", max_num_seqs=1)])
    jobs = [Job("i", 0.0, "m", 100, 500), Job("b1", 0.1, "m", 100, 10),
            Job("b2", 0.2, "m", 100, 10), Job("b3", 0.3, "m", 100, 10)]  # fmt: skip
    jobs[3].rejected = "batch_deadline_exceeded"  # as the gate core's batch feed marks it
    sim.run(jobs[:3])
    batch = [False, True, True, True]
    # b1 finishes long after 1 s (it waits for the 500-token request); b2 has a day.
    deadlines = [math.inf, 1.0, 86400.0, 86400.0]
    assert ev.batch_missed(jobs[1], 1.0) and not ev.batch_missed(jobs[2], 86400.0)
    assert ev.batch_missed(jobs[3], 86400.0)  # never finished
    slos = {"m": ev.Slo(ttft_s=1.0, tpot_s=0.05)}
    (day,) = ev.by_day(jobs, batch, deadlines, slos, sim.all_engines(), [], 1, sim.now)
    assert (day.batch, day.batch_missed, day.interactive, day.slo_met) == (3, 2, 1, 1)
    assert day.gpu_hours == pytest.approx(sim.now / 3600)


def test_long_term_plans_a_start_up_shortfall_once_and_times_an_infeasible_one_apart() -> None:
    st = setting(startup_min=2.0)  # one 5-minute slot before anything asked for now serves
    cap = st.engines[0].tokens_per_s
    # Demand of five engines from now on: slot 0 can only have the one running.
    demand = [5 * cap] * 60
    series = {(MODEL, "r", "interactive"): demand, (MODEL, "r", "batch"): [0.0] * 60}
    running = (RunningEngine(MODEL, "r", "A100", age_min=30.0),)
    fleet = FleetState(0.0, running, {(MODEL, "r"): 1.0})
    policy = LongTerm("oracle", st, TrueFuture(series, smooth_min=1))
    target = policy.decide(0, fleet)
    # One program, solved once: the slot it cannot help is a named shortfall, not infeasible.
    assert (policy.infeasible, len(policy.solve_s), policy.elastic_s) == (0, 1, [])
    # The solver's part of the plan's time, PuLP's building of the program left out.
    assert policy.plan is not None and policy.solver_s == [policy.plan.solve_s]
    assert 0 < policy.solver_s[0] < policy.solve_s[0]
    assert policy.startup_short == 1
    assert target[KEY] == math.ceil(1.2 * 5) and policy.plan is not None
    assert {s.kind for s in policy.plan.shortfalls} == {"startup"}
    # A quota of three GPUs cannot hold six engines: infeasible, the elastic copy timed apart.
    tight = LongTerm("oracle", replace(st, quotas={("r", "A100"): 3}), TrueFuture(series, 1))
    assert tight.decide(0, fleet)[KEY] == 3
    assert (tight.infeasible, len(tight.solve_s), len(tight.elastic_s)) == (1, 1, 1)
    assert tight.solve_s[0] > 0 and tight.elastic_s[0] > 0
    assert tight.solver_s == tight.solve_s  # not apart when the first program is infeasible


def test_lt_ua_meets_a_surprise_with_the_type_that_starts_fastest() -> None:
    # Two types: the cheaper per token (A100) starts in 8 minutes, the H100 in 6.
    a100, h100 = (
        capacity_at_slo(PerfModel.named(g, MODEL), SHAPE, 0.05, 1) for g in ("A100", "H100")
    )
    types = (EngineType(MODEL, "A100", 1, a100.prompt_tokens_per_s, 8.0),
             EngineType(MODEL, "H100", 1, h100.prompt_tokens_per_s, 6.0))  # fmt: skip
    st = Setting(("r",), (GpuType("A100", 1.8), GpuType("H100", 3.5)), types, slot_minutes=5,
                 slots=6, solver="cbc")  # fmt: skip
    assert st.cheapest(MODEL).gpu == "A100"
    flat = 0.5 * types[0].tokens_per_s  # the plan: one A100 holds it with headroom
    series = {(MODEL, "r", "interactive"): [flat] * 120, (MODEL, "r", "batch"): [0.0] * 120}
    seen = {"demand": flat}
    policy = LongTerm("lt-ua", st, TrueFuture(series, smooth_min=1), gated=True,
                      recent=lambda now: {(MODEL, "r"): seen["demand"]})  # fmt: skip
    fleet = FleetState(60.0, (RunningEngine(MODEL, "r", "A100", 60.0),), {(MODEL, "r"): 0.5})
    first = policy.decide(60, fleet)
    assert first == {(MODEL, "r", "A100"): 1, (MODEL, "r", "H100"): 0} and policy.overrides == 0
    # Demand within `surprise` of the forecast: the plan stands.
    seen["demand"] = 1.4 * flat
    assert policy.decide(61, fleet) == first and policy.overrides == 0
    # Four times the forecast: H100s for what the engines asked for cannot hold, at once.
    seen["demand"] = 4 * flat
    got = policy.decide(62, fleet)
    assert got[MODEL, "r", "A100"] == 1 and got[MODEL, "r", "H100"] >= 1
    have = (
        got[MODEL, "r", "A100"] * types[0].tokens_per_s
        + got[MODEL, "r", "H100"] * types[1].tokens_per_s
    )
    assert have >= (1 + st.headroom) * 4 * flat
    assert have - types[1].tokens_per_s < (1 + st.headroom) * 4 * flat  # no more than that
    assert policy.overrides == 1
