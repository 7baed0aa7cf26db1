"""The planner's evaluation: days of the planner workload replayed through the cluster simulator
under five scaling policies (reactive, lt-i, lt-u, lt-ua, oracle); docs/PLANNER.md.

Every request goes through `gateway.simulate.GateFrontend`: the gateway's own gate core
(admission, the fairness queue, the batch feed when the core has one, SageServe's region-first
predicted-latency routing) on the simulator's clock, over engines that join after their start-up
time and drain when a policy lets them go (`planner.evaluate.Replay`). The simulator coalesces
pure decode steps (exact: engines/cluster.py). Forecasts see only the minutes before the
planning time; they are made once per planning minute and shared by lt-i, lt-u and lt-ua.

    .venv/bin/python benchmarks/planner.py            # the week at peak_rps 1.5: docs/planner.json
    .venv/bin/python benchmarks/planner.py --quick    # 1 day at peak_rps 1, 30-minute slots
    .venv/bin/python benchmarks/planner.py --from-json docs/planner.json   # the report again
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine
from benchmarks.planner_report import plot, report, table
from engines.cluster import ClusterSim, EngineSpec, Job
from engines.perf_model import PerfModel, SeqWork
from gateway.config.schema import parse
from gateway.core.request import RequestInfo
from gateway.routing.latency import EngineProfile, PredictedLatency
from gateway.simulate import GateFrontend, SimRequest, request_info
from planner import evaluate as ev
from planner.capacity import RequestShape, capacity_at_slo
from planner.forecast import ForecastConfig
from planner.ilp import highs_available, solve
from planner.policies import (
    POLICIES,
    LongTerm,
    PastForecaster,
    Setting,
    TrueFuture,
    build,
)
from planner.problem import EngineType, GpuType, Key, PlanInput, RunningEngine
from planner.workload import CLASSES, Trace, WorkloadConfig, generate, load_real

DOCS = Path(__file__).resolve().parents[1] / "docs"
GPUS = (GpuType("A100", 1.8), GpuType("H100", 3.5))
STARTUP_MIN = {"H100": 6.0, "A100": 8.0}  # pull, load weights, warm up
TP = {"llama-3.1-70b": 4}
TPOT_SLO_S = 0.05


@dataclass(frozen=True, slots=True)
class Run:
    days: int
    peak_rps: float
    seed: int
    max_num_seqs: int
    slot_minutes: int
    slots: int
    quota_a100: int
    quota_h100: int
    drain_s: float = 7200.0
    quantile: float = 0.95  # of the interactive forecast the plans size for
    smooth_min: int = 1  # minutes of demand averaged into one forecast step
    oracle_smooth_min: int = 5  # minutes of true demand a slot's peak is averaged over
    time_limit_s: float = 2.0  # per solve; the best plan found by then is kept


# The setting ------------------------------------------------------------------------------


def setting(run: Run, models: tuple[str, ...], regions: tuple[str, ...]) -> Setting:
    """Engine types from the performance model at the TPOT SLO, for the real trace's mean
    request (sizes are the real hour's, so nothing of the generated future is read)."""
    real = load_real()
    shape = RequestShape(float(real.prompt.mean()), float(real.output.mean()))
    engines = []
    for m in models:
        for g in ("A100", "H100"):
            cap = capacity_at_slo(
                PerfModel.named(g, m, TP.get(m, 1)), shape, TPOT_SLO_S, run.max_num_seqs
            )
            engines.append(EngineType(m, g, TP.get(m, 1), cap.prompt_tokens_per_s, STARTUP_MIN[g]))
    quotas = {(r, "A100"): run.quota_a100 for r in regions}
    quotas.update({(r, "H100"): run.quota_h100 for r in regions})
    return Setting(
        regions,
        GPUS,
        tuple(engines),
        quotas,
        min_engines=1,
        slot_minutes=run.slot_minutes,
        slots=run.slots,
        time_limit_s=run.time_limit_s,
    )


def slos(models: tuple[str, ...]) -> dict[str, ev.Slo]:
    """TTFT: ten times the unloaded prefill of the real trace's 95th-percentile prompt on the
    model's A100 engine, at least one second; per output token, the TPOT SLO the engines are
    sized for."""
    p95 = int(np.quantile(load_real().prompt, 0.95))
    out = {}
    for m in models:
        perf = PerfModel.named("A100", m, TP.get(m, 1))
        prefill = sum(perf.step_time([SeqWork(c, min(2048, p95 - c))]) for c in range(0, p95, 2048))
        out[m] = ev.Slo(ttft_s=max(1.0, round(10 * prefill, 1)), tpot_s=TPOT_SLO_S)
    return out


def series_of(trace: Trace) -> dict[tuple[str, str, str], list[float]]:
    """Prompt tokens per second in each minute, per (model, region, class)."""
    d = trace.demand().prompt_tokens
    cfg = trace.config
    return {
        (m, r.name, c): list(d[mi, ri, ci] / 60.0)
        for mi, m in enumerate(cfg.models)
        for ri, r in enumerate(cfg.regions)
        for ci, c in enumerate(CLASSES)
    }


def initial_fleet(st: Setting, series: dict[tuple[str, str, str], list[float]]) -> dict[Key, int]:
    """The same start for every policy: the cheapest type, enough for the first hour's
    busiest minute with headroom."""
    out = {k: 0 for k in st.engine_keys()}
    for m, r in st.series:
        e = st.cheapest(m)
        peak = max(series[m, r, "interactive"][:60]) + np.mean(series[m, r, "batch"][:60])
        out[m, r, e.gpu] = max(st.min_engines, math.ceil((1 + st.headroom) * peak / e.tokens_per_s))
    return out


def spec(key: Key, n: int, run: Run) -> EngineSpec:
    m, r, g = key
    return EngineSpec(f"{m}/{r}/{g}/{n}", r, m, m, g, TP.get(m, 1), max_num_seqs=run.max_num_seqs)


def jobs_of(trace: Trace) -> tuple[list[Job], list[bool], list[float]]:
    cfg = trace.config
    regions = [r.name for r in cfg.regions]
    has_deadline = "deadline" in {f.name for f in fields(RequestInfo)}
    jobs, batch, deadlines = [], [], []
    for i in range(len(trace)):
        m, r = cfg.models[trace.model[i]], regions[trace.region[i]]
        t, b = float(trace.arrival_s[i]), bool(trace.batch[i])
        info = request_info(
            f"j{i}", "batch" if b else "interactive", "default", m, int(trace.prompt[i]), t
        )
        info = replace(info, preferred_regions=(r,), klass=CLASSES[int(b)])
        if b and has_deadline:
            info = replace(info, deadline=float(trace.deadline_s[i]))
        jobs.append(
            Job(f"j{i}", t, m, int(trace.prompt[i]), int(trace.output[i]), SimRequest(info))
        )
        batch.append(b)
        deadlines.append(float(trace.deadline_s[i]))
    return jobs, batch, deadlines


# One policy -------------------------------------------------------------------------------

_SHARED: dict[str, Any] = {}  # what forked workers inherit: the trace, forecasts, the setting


def replay(name: str) -> dict[str, Any]:
    run: Run = _SHARED["run"]
    trace: Trace = _SHARED["trace"]
    st: Setting = _SHARED["setting"]
    series = _SHARED["series"]
    past: PastForecaster = _SHARED["past"]
    t0 = time.perf_counter()
    start = initial_fleet(st, series)
    specs = [spec(k, 0, run) for k, n in start.items() for _ in range(n)]
    specs = [replace(s, id=f"{s.id.rsplit('/', 1)[0]}/i{i}") for i, s in enumerate(specs)]
    doc: dict[str, Any] = {
        "tenants": {
            "interactive": {"weight": 1.0},
            "batch": {"weight": 1.0, "demand_class": "batch"},
        },
        "engines": {},
    }
    for s in specs:
        doc["engines"].setdefault(s.region, {}).setdefault(s.model, []).append(
            {
                "id": s.id,
                "kind": "sim",
                "gpu": s.gpu,
                "arch": s.arch,
                "tp": s.tp,
                "max_num_seqs": s.max_num_seqs,
                "max_running": s.max_num_seqs,
            }
        )
    cfg = parse(doc)
    router = PredictedLatency({})
    front = GateFrontend(cfg, router, oit=False, scrape_interval=cfg.server.health_interval_s)

    def profile(s: EngineSpec) -> None:
        router.set_profile(
            s.id, EngineProfile.named(s.gpu, s.arch, s.tp, s.max_num_seqs, s.max_batched_tokens)
        )

    for s in specs:
        profile(s)
    sim = ClusterSim(specs, front, coalesce=True)
    front.sim = sim
    end_s = run.days * ev.DAY_S

    def recent(now_min: int) -> dict[tuple[str, str], float]:
        lo = max(0, now_min - 5)
        return {
            (m, r): float(np.mean(series[m, r, "interactive"][lo:now_min]) if now_min else 0.0)
            for m, r in st.series
        }

    policy = build(name, st, past, TrueFuture(series, run.oracle_smooth_min), recent)
    rep = ev.Replay(
        sim, policy, st, lambda k, n: spec(k, n, run), until_s=end_s - 60, on_add=profile
    )
    jobs, batch, deadlines = jobs_of(trace)
    sim.run(jobs, until=end_s + run.drain_s)
    wall = time.perf_counter() - t0
    days = ev.by_day(
        jobs, batch, deadlines, _SHARED["slos"], sim.all_engines(), rep.added, run.days, end_s
    )
    done = [j for j, b in zip(jobs, batch, strict=True) if not b and j.finished is not None]
    per_model = {}
    for m in st.models:
        mine = [j for j in done if j.model == m]
        per_model[m] = {
            "p95_ttft_s": ev.percentile([j.ttft or 0.0 for j in mine], 0.95),
            "p95_e2e_s": ev.percentile([j.latency or 0.0 for j in mine], 0.95),
        }
    price = {g.name: g.cost_per_hour for g in GPUS}
    cost = sum(e.gpu_seconds(end_s) / 3600 * price[e.spec.gpu] for e in sim.all_engines())
    total = {
        "gpu_hours": sum(d.gpu_hours for d in days),
        "cost": cost,
        "slo_attainment": sum(d.slo_met for d in days) / max(1, sum(d.interactive for d in days)),
        "batch_missed": sum(d.batch_missed for d in days),
        "batch": sum(d.batch for d in days),
        "scale_ups": sum(d.scale_ups for d in days),
        "startup_gpu_minutes": sum(d.startup_gpu_min for d in days),
        "unfinished": sum(1 for j in jobs if j.finished is None),
        "rejected": sum(1 for j in jobs if j.rejected),
        "per_model": per_model,
        "days": [
            {f.name: getattr(d, f.name) for f in fields(d)} | {"slo_attainment": d.slo_attainment}
            for d in days
        ],
        "wall_s": wall,
        "decide_max_s": max(rep.decide_s, default=0.0),
    }
    if isinstance(policy, LongTerm):
        total["solve_max_s"] = max(policy.solve_s, default=0.0)
        total["solve_mean_s"] = float(np.mean(policy.solve_s)) if policy.solve_s else 0.0
        total["solve_p99_s"] = ev.percentile(policy.solve_s, 0.99)
        total["plans"] = len(policy.solve_s)
        total["elastic_max_s"] = max(policy.elastic_s, default=0.0)
        total["not_optimal"] = policy.not_optimal
        total["failed"] = policy.failed
        total["startup_short"] = policy.startup_short
        total["infeasible"] = policy.infeasible
        total["overrides"] = policy.overrides
    total["samples"] = [(s.minute, s.gpus, s.serving_gpus) for s in rep.samples]
    print(
        f"{name}: {total['gpu_hours']:.1f} GPU-h, SLO {100 * total['slo_attainment']:.2f}%, "
        f"batch missed {total['batch_missed']}, scale-ups {total['scale_ups']}, "
        f"{wall:.0f} s",
        flush=True,
    )
    return total


def _forecast_at(minute: int) -> tuple[int, dict[tuple[str, str, str], Any]]:
    st: Setting = _SHARED["setting"]
    past: PastForecaster = _SHARED["past"]
    return minute, past.forecasts(minute, st.slot_minutes * st.slots)


# The whole benchmark ----------------------------------------------------------------------


def ilp_solvers(
    st: Setting, series: dict[tuple[str, str, str], list[float]], past: PastForecaster, minute: int
) -> dict[str, float]:
    """CBC against HiGHS on the evaluation's program at one planning minute (the busiest)."""
    fc = past.forecasts(minute, st.slot_minutes * st.slots)
    inter = {
        (m, r): tuple(f.upper for f in fc[m, r, "interactive"].slots(st.slot_minutes))
        for m, r in st.series
    }
    # Running now: what the forecast's first slot needs, the cheapest type first within the
    # quotas, so that the program is feasible.
    current = []
    used: dict[tuple[str, str], int] = {}
    for m, r in st.series:
        need = (1 + st.headroom) * inter[m, r][0]
        for e in st.by_preference(m):
            room = (st.quotas.get((r, e.gpu), 10**9) - used.get((r, e.gpu), 0)) // e.gpus
            n = min(room, math.ceil(need / e.tokens_per_s))
            if n > 0:
                current.append(RunningEngine(m, r, e.gpu, 60.0, n))
                used[r, e.gpu] = used.get((r, e.gpu), 0) + n * e.gpus
                need -= n * e.tokens_per_s
        if need > 0:
            raise ValueError(f"{m} in {r}: the quotas cannot hold the busiest program's demand")
    inp = PlanInput(
        st.regions,
        st.gpus,
        st.engines,
        st.slots,
        float(st.slot_minutes),
        inter,
        quotas=st.quotas,
        current=current,
        headroom=st.headroom,
        min_engines={k: 1 for k in st.series},
    )
    out = {}
    for solver in ("cbc", "highs"):
        if solver == "highs" and not highs_available():
            continue
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            solve(inp, solver=solver)  # type: ignore[arg-type]
            best = min(best, time.perf_counter() - t0)
        out[solver] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 day at peak_rps 1, 30-minute slots")
    p.add_argument("--days", type=int)
    p.add_argument("--peak-rps", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=1)
    p.add_argument("--slot-minutes", type=int)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--quantile", type=float, default=0.95, help="of the interactive forecast")
    p.add_argument("--smooth-min", type=int, default=1, help="minutes per forecast step")
    p.add_argument("--oracle-smooth-min", type=int, default=5,
                   help="minutes of true demand averaged into the oracle's slot peak")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="policies replayed in parallel")
    p.add_argument(
        "--out", type=Path, default=DOCS / "planner.json", help="PLANNER.md and plots beside it"
    )
    p.add_argument("--from-json", type=Path, help="write docs/PLANNER.md from an earlier run")
    a = p.parse_args(argv)
    if a.from_json:
        (DOCS / "PLANNER.md").write_text(
            report(json.loads(a.from_json.read_text()), GPUS, STARTUP_MIN)
        )
        return 0
    run = Run(
        days=a.days or (1 if a.quick else 7),
        peak_rps=a.peak_rps or (1.0 if a.quick else 1.5),
        seed=a.seed,
        max_num_seqs=a.max_num_seqs,
        slot_minutes=a.slot_minutes or (30 if a.quick else 15),
        slots=12,
        quota_a100=24,
        quota_h100=48,
        quantile=a.quantile,
        smooth_min=a.smooth_min,
        oracle_smooth_min=a.oracle_smooth_min,
    )
    names = [n for n in a.policies.split(",") if n]
    t_all = time.perf_counter()
    trace = generate(WorkloadConfig(days=run.days, seed=run.seed, peak_rps=run.peak_rps))
    series = series_of(trace)
    st = setting(run, trace.config.models, tuple(r.name for r in trace.config.regions))
    # ARIMA(3,1,2) on the last four hours, at most 25 optimiser iterations: the default six
    # hours and 50 took twice as long for every one of the thousands of fits. Per-minute
    # forecasts at the 0.95 quantile: forecasts of 2- to 5-minute means (the oracle's quantity)
    # and the 0.9 quantile kept SLO attainment below reactive scaling's (docs/PLANNER.md).
    fcfg = ForecastConfig(window=240, maxiter=25, quantile=run.quantile, smooth_min=run.smooth_min)
    past = PastForecaster(series, fcfg)
    _SHARED.update(run=run, trace=trace, setting=st, series=series, past=past, slos=slos(st.models))
    print(
        f"{len(trace)} requests over {run.days} days at peak_rps {run.peak_rps:g}; "
        f"engine types (prompt tokens/s at the SLO): "
        + ", ".join(f"{e.model}/{e.gpu} {e.tokens_per_s:.0f}" for e in st.engines),
        flush=True,
    )
    # Forecasts at every planning minute, each from the minutes before it only.
    t0 = time.perf_counter()
    minutes = list(range(0, run.days * 1440, run.slot_minutes))
    ctx = mp.get_context("fork")
    if any(n.startswith("lt-") for n in names):
        with ctx.Pool(a.jobs) as pool:
            for minute, fc in pool.imap_unordered(_forecast_at, minutes, chunksize=4):
                past.cache[minute, st.slot_minutes * st.slots] = fc
    forecast_s = time.perf_counter() - t0
    print(f"forecasts at {len(minutes)} planning minutes: {forecast_s:.0f} s", flush=True)
    with ctx.Pool(min(a.jobs, len(names))) as pool:
        results = dict(zip(names, pool.map(replay, names, chunksize=1), strict=True))
    accuracy = ev.forecast_accuracy(
        {k: v for k, v in series.items() if k[2] == "interactive"},
        {
            m: {k: f.point for k, f in past.cache[m, st.slot_minutes * st.slots].items()}
            for m in minutes
            if (m, st.slot_minutes * st.slots) in past.cache
        },
    )
    busiest = max(minutes, key=lambda m: sum(v[m] for v in series.values()))
    solvers = ilp_solvers(st, series, past, busiest) if past.cache else {}
    plots = plot(results, series, st, run.days, a.out.parent)
    out = {
        "machine": machine(),
        "run": {f.name: getattr(run, f.name) for f in fields(run)},
        "requests": len(trace),
        "engine_types": [
            {
                "model": e.model,
                "gpu": e.gpu,
                "gpus": e.gpus,
                "prompt_tokens_per_s": e.tokens_per_s,
                "startup_min": e.startup_min,
            }
            for e in st.engines
        ],
        "slo": {m: {"ttft_s": s.ttft_s, "tpot_s": s.tpot_s} for m, s in _SHARED["slos"].items()},
        "policies": {n: {k: v for k, v in r.items() if k != "samples"} for n, r in results.items()},
        "solve_s": max((r.get("solve_max_s", 0.0) for r in results.values()), default=0.0),
        "elastic_solve_s": max(
            (r.get("elastic_max_s", 0.0) for r in results.values()), default=0.0
        ),
        "solvers_busiest_program_s": solvers,
        "time_limit_s": st.time_limit_s,
        "forecast": {"/".join(k): {"smape": s, "mape": m} for k, (s, m) in accuracy.items()},
        "forecast_wall_s": forecast_s,
        "wall_s": time.perf_counter() - t_all,
        "plots": plots,
    }
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    (a.out.parent / "PLANNER.md").write_text(report(out, GPUS, STARTUP_MIN))
    print(table(results))
    print(f"solvers on the busiest program: {solvers}; total {out['wall_s']:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
