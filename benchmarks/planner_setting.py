"""The planner evaluation's setting: the run's parameters (`Run`), the GPU and engine types
from the performance model, the SLOs, the demand series and the jobs of a trace, and the fleet
every policy starts from. benchmarks/planner.py replays the policies on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from benchmarks.planner_oracle import ORACLES
from engines.cluster import EngineSpec, Job
from engines.perf_model import PerfModel, SeqWork
from gateway.core.request import RequestInfo
from gateway.simulate import SimRequest, request_info
from planner import evaluate as ev
from planner.capacity import RequestShape, capacity_at_slo
from planner.policies import Setting
from planner.problem import EngineType, GpuType, Key
from planner.workload import CLASSES, Trace, load_real

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
    # The oracle's candidates: (minutes of true demand a slot's peak is averaged over, its
    # headroom); the oracle is the cheapest that keeps reactive scaling's SLO attainment.
    oracle: tuple[tuple[int, float], ...] = ORACLES
    # Headroom (capacity planned above the forecast interactive demand) and lt-ua's override
    # threshold over the slot's upper forecast: chosen with lt-ua on the seed-1 week
    # (docs/PLANNER.md, choosing the plan's step, headroom and override).
    surprise: float = 1.25
    time_limit_s: float = 2.0  # per solve; the best plan found by then is kept
    headroom: float = 0.15


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
        headroom=run.headroom,
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
