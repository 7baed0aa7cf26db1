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
import hashlib
import json
import math
import multiprocessing as mp
import pickle
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine
from benchmarks.planner_oracle import oracle_candidates, oracle_name, parse_candidate, pick_oracle
from benchmarks.planner_report import plot, report, table
from benchmarks.planner_setting import (
    GPUS,
    STARTUP_MIN,
    Run,
    initial_fleet,
    jobs_of,
    series_of,
    setting,
    slos,
    spec,
)
from benchmarks.planner_solvers import ilp_solvers
from engines.cluster import ClusterSim, EngineSpec
from gateway.config.schema import parse
from gateway.routing.latency import EngineProfile, PredictedLatency
from gateway.simulate import GateFrontend
from planner import evaluate as ev
from planner.forecast import ForecastConfig
from planner.policies import (
    POLICIES,
    LongTerm,
    PastForecaster,
    Setting,
    TrueFuture,
    build,
)
from planner.workload import Trace, WorkloadConfig, generate

DOCS = Path(__file__).resolve().parents[1] / "docs"
# One policy -------------------------------------------------------------------------------

# lt-ua's override compares the demand of the last minutes with the plan's forecast: the mean
# of two passes the threshold minutes sooner in a burst than that of five, and one minute's
# count is mostly noise.
RECENT_MIN = 2
_SHARED: dict[str, Any] = {}  # what forked workers inherit: the trace, forecasts, the setting


def replay(name: str) -> dict[str, Any]:
    """One policy over the trace; `oracle@W:H` is the oracle sizing for W-minute means with
    headroom H."""
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
        lo = max(0, now_min - RECENT_MIN)
        return {
            (m, r): float(np.mean(series[m, r, "interactive"][lo:now_min]) if now_min else 0.0)
            for m, r in st.series
        }

    base, _, variant = name.partition("@")
    w, h = run.oracle[0]
    if variant:  # oracle@W:H
        w, h = parse_candidate(variant)
        st = replace(st, headroom=h)
    policy = build(base, st, past, TrueFuture(series, w), recent, surprise=run.surprise)
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
        total["solver_max_s"] = max(policy.solver_s, default=0.0)
        total["solver_p99_s"] = ev.percentile(policy.solver_s, 0.99)
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


def _forecast_key(
    series: dict[tuple[str, str, str], list[float]],
    past: PastForecaster,
    minutes: list[int],
    horizon: int,
) -> str:
    """What the forecasts depend on: the series, the forecast settings, the planning minutes
    and the horizon."""
    h = hashlib.sha256(repr((sorted(series), past.configs, minutes, horizon)).encode())
    for k in sorted(series):
        h.update(np.asarray(series[k], dtype=float).tobytes())
    return h.hexdigest()


def _load_forecasts(path: Path, key: str, past: PastForecaster) -> bool:
    """Fill `past`'s cache from a file an earlier run wrote for the same `key`; False (and
    why, when the file exists) otherwise."""
    if not path.exists():
        return False
    try:
        saved = pickle.loads(path.read_bytes())
    except Exception as e:  # unpickling other bytes fails in any of a dozen ways
        print(f"{path}: not a forecast file of this benchmark ({e}); forecasting again")
        return False
    if not isinstance(saved, dict) or saved.get("key") != key:
        print(f"{path}: forecasts of another trace or setting; forecasting again")
        return False
    past.cache.update(saved["cache"])
    return True


# The whole benchmark ----------------------------------------------------------------------


CARRIED = ("plan_variants", "held_out", "forecast_variants")
# The command line's defaults are the run's (Run is a slots dataclass: its fields read so).
_RUN_DEFAULTS = {f.name: f.default for f in fields(Run)}


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


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
    p.add_argument(
        "--headroom",
        type=_non_negative,
        default=_RUN_DEFAULTS["headroom"],
        help="capacity above the forecast",
    )
    p.add_argument(
        "--surprise",
        type=_non_negative,
        default=_RUN_DEFAULTS["surprise"],
        help="lt-ua's override: recent demand over the slot's upper forecast that starts "
        "engines at once",
    )
    p.add_argument(
        "--oracle",
        type=oracle_candidates,
        default=_RUN_DEFAULTS["oracle"],
        help="the oracle's candidates as W:H pairs (a slot sized for its busiest W-minute "
        "mean of the true demand, with headroom H); the cheapest that keeps reactive's SLO "
        "is the oracle",
    )
    p.add_argument("--jobs", type=int, default=2, help="policies replayed in parallel")
    p.add_argument(
        "--forecasts",
        type=Path,
        help="a file of forecasts (a pickle: only one this benchmark wrote): read when an "
        "earlier run with the same trace and forecast settings wrote it, written otherwise "
        "(the report's forecast time is then that of reading it)",
    )
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
        slot_minutes=a.slot_minutes or (30 if a.quick else 5),
        slots=12,
        quota_a100=24,
        quota_h100=48,
        quantile=a.quantile,
        smooth_min=a.smooth_min,
        headroom=a.headroom,
        surprise=a.surprise,
        oracle=a.oracle,
    )
    names = [n for n in a.policies.split(",") if n]
    # Every oracle candidate is replayed; the choice is made once reactive's SLO is known.
    oracles_run = [oracle_name(c) for c in run.oracle]
    names = [x for n in names for x in (oracles_run if n == "oracle" else [n])]
    t_all = time.perf_counter()
    a.out.parent.mkdir(parents=True, exist_ok=True)
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
    key = _forecast_key(series, past, minutes, st.slot_minutes * st.slots)
    loaded = a.forecasts is not None and _load_forecasts(a.forecasts, key, past)
    if not loaded and any(n.startswith("lt-") for n in names):
        with ctx.Pool(a.jobs) as pool:
            for minute, fc in pool.imap_unordered(_forecast_at, minutes, chunksize=4):
                past.cache[minute, st.slot_minutes * st.slots] = fc
        if a.forecasts:
            a.forecasts.write_bytes(pickle.dumps({"key": key, "cache": past.cache}))
    forecast_s = time.perf_counter() - t0
    print(f"forecasts at {len(minutes)} planning minutes: {forecast_s:.0f} s", flush=True)
    with ctx.Pool(min(a.jobs, len(names))) as pool:
        results = dict(zip(names, pool.map(replay, names, chunksize=1), strict=True))
    oracles = pick_oracle(results, run.oracle)
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
        # The solver's time on the program; with PuLP's building of it, "plan_s".
        "solve_s": max((r.get("solver_max_s", 0.0) for r in results.values()), default=0.0),
        "plan_s": max((r.get("solve_max_s", 0.0) for r in results.values()), default=0.0),
        "elastic_solve_s": max(
            (r.get("elastic_max_s", 0.0) for r in results.values()), default=0.0
        ),
        "solvers_busiest_program_s": solvers,
        "time_limit_s": st.time_limit_s,
        "forecast": {"/".join(k): {"smape": s, "mape": m} for k, (s, m) in accuracy.items()},
        "forecast_wall_s": forecast_s,
        "wall_s": time.perf_counter() - t_all,
        "plots": plots,
        **oracles,
    }
    # Figures of separate runs an earlier page kept (the forecast-choice runs) stay with it.
    if a.out.exists():
        old = json.loads(a.out.read_text())
        out.update({k: old[k] for k in CARRIED if k in old})
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    (a.out.parent / "PLANNER.md").write_text(report(out, GPUS, STARTUP_MIN))
    print(table(results))
    print(f"solvers on the busiest program: {solvers}; total {out['wall_s']:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
