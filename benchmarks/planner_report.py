"""docs/PLANNER.md from the planner evaluation's results (benchmarks/planner.py): the setting,
per-policy and per-day tables, the targets against reactive scaling and the oracle, solve times,
forecast error and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import pyplot, save_figure
from planner.policies import Setting
from planner.problem import GpuType
from planner.workload_trace import CLASSES


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| policy | GPU-hours | cost ($) | SLO attainment | batch missed | scale-ups | "
        "start-up GPU-min | largest solve (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        solver = r.get("solver_max_s")
        rows.append(
            f"| {name} | {r['gpu_hours']:.1f} | {r['cost']:.0f} | "
            f"{100 * r['slo_attainment']:.2f}% | {r['batch_missed']} of {r['batch']} | "
            f"{r['scale_ups']} | {r['startup_gpu_minutes']:.0f} | "
            f"{'-' if solver is None else f'{solver:.2f}'} |"
        )
    rows.append("")
    rows.append(
        "| policy | day | GPU-hours | SLO attainment | batch missed | scale-ups | "
        "start-up GPU-min |"
    )
    rows.append("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for d in r["days"]:
            rows.append(
                f"| {name} | {d['day']} | {d['gpu_hours']:.1f} | "
                f"{100 * d['slo_attainment']:.2f}% | {d['batch_missed']} of {d['batch']} "
                f"| {d['scale_ups']} | {d['startup_gpu_min']:.0f} |"
            )
    return "\n".join(rows)


def report(out: dict[str, Any], gpus: Sequence[GpuType], startup_min: Mapping[str, float]) -> str:
    """docs/PLANNER.md from a run's JSON (`gpus` and `startup_min`: the prices and start-up
    times it ran with): the setting, the figures, the targets met or not."""
    pol, run = out["policies"], out["run"]
    lines = [
        "# Planner: SageServe's forecast-and-solve scaling against reactive scaling",
        "",
        f"Measured by `make bench-planner` (`benchmarks/planner.py`) on {out['machine']}: "
        f"{out['wall_s'] / 60:.0f} minutes of wall time, two policies at a time on the two "
        "cores. Raw figures in `docs/planner.json`; "
        "`benchmarks/planner.py --from-json docs/planner.json` writes this page again."
        + (f" {out['note']}" if out.get("note") else ""),
        "",
        "## Setting",
        "",
        f"- Trace: `planner/workload.py` (docs/PLANNER_WORKLOAD.md), {run['days']} days at "
        f"`peak_rps` {run['peak_rps']:g}, seed {run['seed']}: {out['requests']:,} requests, "
        "3 regions, 4 models, about 20% batch with deadlines of 1 to 24 h, bursts."
        + (
            " The whole week the generator builds."
            if run["days"] >= 7
            else f" The first {run['days']} days of the week the generator builds."
        ),
        "- Replay: every request goes through the gateway's own gate core on the cluster "
        "simulator's clock (`gateway.simulate.GateFrontend`: admission, the fairness queue, "
        "the batch feed, region-first predicted-latency routing). Engines are asked for, serve "
        "only after their start-up time, drain, and leave; each is paid (GPUs x time) from "
        "being asked for to leaving. Pure decode runs are coalesced exactly.",
        f"- Engines: `max_num_seqs` {run['max_num_seqs']} (a scaled-down engine, so that a "
        "region needs several at its peak), start-up "
        + ", ".join(f"{g} {m:g} min" for g, m in startup_min.items())
        + f"; GPU quotas per region A100 {run['quota_a100']}, H100 {run['quota_h100']}; prices "
        + ", ".join(f"{g.name} ${g.cost_per_hour:g}/h" for g in gpus)
        + ". Capacity per engine type (prompt tokens/s at the SLO, `planner/capacity.py`): "
        + ", ".join(
            f"{e['model']}/{e['gpu']} {e['prompt_tokens_per_s']:.0f}" for e in out["engine_types"]
        )
        + ".",
        "- SLOs (interactive requests; attainment is the share meeting both TTFT and time per "
        "output token): "
        + ", ".join(
            f"{m} TTFT {s['ttft_s']:g} s, TPOT {1000 * s['tpot_s']:.0f} ms"
            for m, s in out["slo"].items()
        )
        + ".",
        f"- Plans: {run['slots']} slots of {run['slot_minutes']} minutes, re-planned every "
        "slot; forecasts (ARIMA(3,1,2) on the last four hours, seasonal-naive fallback) of "
        f"{_of(run.get('smooth_min', 1))}, from the minutes before the planning time "
        f"only; a slot is sized for the largest upper {run.get('quantile', 0.95):g} quantile "
        f"in it, plus {100 * run.get('headroom', 0.2):g}% headroom. The oracle sizes each "
        f"slot for its busiest {out.get('oracle_smooth_min', 5)}-minute mean of the true "
        f"demand, plus {100 * out.get('oracle_headroom', run.get('headroom', 0.2)):g}% headroom"
        + (
            ": of the widths and headrooms tried, the cheapest whose SLO attainment is at least "
            "reactive scaling's, the cheapest plan of the true future at equal service found "
            "(each candidate's figures under Targets). "
            if out.get("oracle_variants")
            else ". "
        )
        + "Demand of a plan's first slot that the engines already running cannot meet (those "
        "asked for now serve only after their start-up) is planned as a penalised, reported "
        "shortfall, so a program is infeasible only when a quota or a batch deadline binds. "
        "Reactive: per (model, "
        "region), up above 0.5 utilisation, down below 0.25, the same start-up times. LT-U "
        "gates the plan by measured utilisation, LT-UA adds an override when demand surprises "
        f"the forecast ({run.get('surprise', 1.5):g} x the slot's upper forecast over the last "
        "2 minutes: engines of the type that starts fastest at once); the oracle plans with the "
        "true future.",
        "",
        "## Results",
        "",
        table(pol),
        "",
        *_latency(pol, out["slo"]),
    ]
    r, o = pol.get("reactive"), pol.get("oracle")
    if r and o:
        lines += [
            "## Targets",
            "",
            "| policy | GPU-hours vs reactive | vs oracle | SLO vs "
            "reactive | batch missed | scale-ups vs reactive |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("lt-i", "lt-u", "lt-ua"):
            if name not in pol:
                continue
            q = pol[name]
            lines.append(
                f"| {name} | {_vs(q['gpu_hours'], r['gpu_hours'])} (target <= -25%) | "
                f"{_vs(q['gpu_hours'], o['gpu_hours'])} (target <= +10%) | "
                f"{_points(q['slo_attainment'], r['slo_attainment'])} | "
                f"{q['batch_missed']} | {q['scale_ups']} vs {r['scale_ups']} |"
            )
        worst = [
            f"{n} {100 * d['slo_attainment']:.2f}% (day {d['day']})"
            for n, q in pol.items()
            if q.get("days")
            for d in [_worst_day(q)]
        ]
        if worst:
            lines += ["", "Each policy's worst day of SLO attainment: " + ", ".join(worst) + "."]
        chosen = (out.get("oracle_smooth_min"), out.get("oracle_headroom"))
        lines += _oracles(out.get("oracle_variants"), chosen, r, pol)
        solvers = out.get("solvers_busiest_program_s", {})
        lt = {n: q for n, q in pol.items() if "plans" in q}
        lines += [
            "",
            "Solve time of the busiest 3 regions x 4 models x 2 GPU types x 12 slots program "
            "(best of three, one process): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in solvers.items())
            + " (target under 1 s).",
            "",
            "Every plan of the run, timed apart (wall time, waits for a core included; two "
            "replays share the two cores; the solver stops at "
            f"{out.get('time_limit_s', 10):g} s with the best plan found so far). The solver's "
            "time is the largest solve above and `solve_s` in the JSON; with PuLP's building "
            "of the program in Python before it, `plan_s`:",
            "",
            "| policy | plans | largest solve (s) | p99 (s) | largest build and solve (s) | "
            "p99 (s) | mean (s) | cut by the time limit | start-up shortfalls | infeasible | "
            "largest elastic re-solve (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        lines += [
            f"| {n} | {q['plans']} | {q.get('solver_max_s', nan):.2f} | "
            f"{q.get('solver_p99_s', nan):.2f} | {q['solve_max_s']:.2f} | "
            f"{q['solve_p99_s']:.2f} | {q['solve_mean_s']:.2f} | {q['not_optimal']} | "
            f"{q['startup_short']} | {q['infeasible']} | {q['elastic_max_s']:.2f} |"
            for n, q in lt.items()
        ]
        lines += [
            "",
            "Start-up shortfalls: plans whose first slot asks for more than the engines running "
            "can give; the plan keeps them all and starts the rest. Infeasible: a quota or a "
            "batch deadline binds; the program is then solved again as an elastic copy that "
            "names what must be missed.",
            "",
        ]
    lines += _plan_variants(out.get("plan_variants"), pol.get("reactive"))
    lines += _held_out(out.get("held_out"))
    lines += _variants(out.get("forecast_variants"))
    fc = out.get("forecast", {})
    if fc:
        lines += [
            "## Forecast error (interactive prompt tokens per minute, at each planning "
            "time over its horizon)",
            "",
            "| series | sMAPE | MAPE |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {100 * v['smape']:.1f}% | {100 * v['mape']:.1f}% |"
                  for k, v in fc.items()]  # fmt: skip
        lines.append("")
    lines += [
        "## Live",
        "",
        "The same controller inside `fairway serve`, with the `sim` actuator, under a day of "
        "locust traffic compressed into minutes: docs/PLANNER_LIVE.md (`make "
        "bench-planner-live`).",
        "",
    ]
    lines += ["## Engines against demand", ""]
    lines += [f"![{p}]({p})" for p in out.get("plots", [])]
    return "\n".join(lines) + "\n"


def _latency(pol: Mapping[str, Any], slo: Mapping[str, Any]) -> list[str]:
    """Each model's p95 TTFT and end-to-end latency of its interactive requests, per policy."""
    names = [n for n, q in pol.items() if q.get("per_model")]
    if not names:
        return []
    lines = [
        "Interactive requests per model: p95 TTFT against the model's TTFT SLO, and p95 "
        "end-to-end latency (s):",
        "",
        "| model | TTFT SLO | " + " | ".join(f"{n} TTFT / e2e" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for m, s in slo.items():
        cells = [
            f"{q['p95_ttft_s']:.2f} / {q['p95_e2e_s']:.1f}"
            for n in names
            for q in [pol[n]["per_model"][m]]
        ]
        lines.append(f"| {m} | {s['ttft_s']:g} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _vs(value: float, ref: float) -> str:
    """`value` against `ref` as a signed percentage."""
    return f"{100 * (value / ref - 1):+.1f}%"


def _points(slo: float, ref: float) -> str:
    """SLO attainment against `ref`, in percentage points."""
    return f"{100 * (slo - ref):+.2f} points"


def _worst_day(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The day of `policy`'s lowest SLO attainment."""
    day: dict[str, Any] = min(policy["days"], key=lambda d: d["slo_attainment"])
    return day


def _oracles(
    variants: list[dict[str, Any]] | None,
    chosen: tuple[int | None, float | None],
    reactive: dict[str, Any],
    pol: dict[str, dict[str, Any]],
) -> list[str]:
    """The oracle at each (width of true-demand mean, headroom) it was replayed with, and the
    policies (if any) that used fewer GPU-hours than the chosen one."""
    if not variants:
        return []
    oracle = pol.get("oracle")
    beaten = [
        n
        for n in ("lt-i", "lt-u", "lt-ua")
        if oracle and n in pol and pol[n]["gpu_hours"] < oracle["gpu_hours"]
    ]
    lines = [
        "",
        "The oracle at each candidate it was replayed with (a slot sized for its busiest "
        "w-minute mean of the true demand plus the headroom; wider means and less headroom are "
        "cheaper and let more minute-scale swings queue past the SLO):",
        "",
        "| w (min) | headroom | GPU-hours | vs reactive | SLO | vs reactive | scale-ups | "
        "batch missed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        h = v.get("headroom")
        mark = " (the oracle)" if (v["smooth_min"], h) == chosen else ""
        lines.append(
            f"| {v['smooth_min']}{mark} | {'-' if h is None else f'{h:g}'} | "
            f"{v['gpu_hours']:,.0f} | "
            f"{_vs(v['gpu_hours'], reactive['gpu_hours'])} | {100 * v['slo_attainment']:.2f}% | "
            f"{_points(v['slo_attainment'], reactive['slo_attainment'])} | "
            f"{v['scale_ups']} | {v['batch_missed']} |"
        )
    if oracle and beaten:
        lines += [
            "",
            f"Here {', '.join(beaten)} used fewer GPU-hours than the oracle. A slot sized for "
            "the busiest minutes of the true demand pays for their Poisson peaks; a plan for a "
            "quantile of the forecast pays for less, and lt-ua's override meets within minutes "
            "what the forecast missed. The oracle is the cheapest of these plans of the true "
            "future at equal service, not a lower bound on policies that react within a slot.",
        ]
    return lines


def _plan_variants(v: dict[str, Any] | None, reactive: dict[str, Any] | None) -> list[str]:
    """The plan's step, its headroom and lt-ua's override, each run on a week; a run is
    compared with reactive scaling of its own week where it names it (`reactive_gpu_hours`,
    `reactive_slo`), else with the page's."""
    if not v:
        return []
    lines = [
        "## Choosing the plan's step, headroom and override",
        "",
        v["setting"],
        "",
        "| week (seed) | slot (min) | headroom | override | policy | GPU-hours | vs reactive | "
        "SLO | vs reactive | worst day |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in v["runs"]:
        ref_h = r.get("reactive_gpu_hours", reactive["gpu_hours"] if reactive else None)
        ref_slo = r.get("reactive_slo", reactive["slo_attainment"] if reactive else None)
        vs = "-" if ref_h is None else _vs(r["gpu_hours"], ref_h)
        pts = "-" if ref_slo is None else _points(r["slo_attainment"], ref_slo)
        lines.append(
            f"| {r.get('seed', '-')} | {r['slot_minutes']} | {r['headroom']:g} | "
            f"{r['override']} | {r['policy']} | {r['gpu_hours']:,.0f} | {vs} | "
            f"{100 * r['slo_attainment']:.2f}% | {pts} | "
            f"{100 * r['worst_day_slo']:.2f}% (day {r['worst_day']}) |"
        )
    return [*lines, "", v["reading"], ""]


def _held_out(v: dict[str, Any] | None) -> list[str]:
    """The chosen setting on a week it was not chosen on."""
    if not v:
        return []
    pol = v["policies"]
    r = pol["reactive"]
    lines = [
        "## A week the setting was not chosen on",
        "",
        v["setting"],
        "",
        "| policy | GPU-hours | vs reactive | SLO | vs reactive | worst day | scale-ups | "
        "batch missed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, q in pol.items():
        worst = _worst_day(q)
        lines.append(
            f"| {name} | {q['gpu_hours']:,.0f} | {_vs(q['gpu_hours'], r['gpu_hours'])} | "
            f"{100 * q['slo_attainment']:.2f}% | "
            f"{_points(q['slo_attainment'], r['slo_attainment'])} | "
            f"{100 * worst['slo_attainment']:.2f}% (day {worst['day']}) | {q['scale_ups']} | "
            f"{q['batch_missed']} of {q['batch']} |"
        )
    return [*lines, "", v["reading"], ""]


def _variants(v: dict[str, Any] | None) -> list[str]:
    """What the forecast is smoothed over and which quantile it plans for: lt-i on shorter
    runs, each against the oracle of its own trace."""
    if not v:
        return []
    lines = [
        "## Choosing the forecast: smoothing and quantile",
        "",
        v["setting"],
        "",
        "| trace | forecast of | quantile | lt-i GPU-hours | vs oracle (w = 5) | lt-i SLO | "
        "oracle (w = 5) SLO | reactive SLO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in v["runs"]:
        reactive = r.get("reactive_slo")
        lines.append(
            f"| {r['trace']} | {_of(r['smooth_min'])} | {r['quantile']:g} | "
            f"{r['gpu_hours']:.1f} | {_vs(r['gpu_hours'], r['oracle_gpu_hours'])} "
            f"| {100 * r['slo_attainment']:.2f}% | {100 * r['oracle_slo']:.2f}% | "
            + (f"{100 * reactive:.2f}% |" if reactive is not None else "not run |")
        )
    return [*lines, "", v["reading"], ""]


def plot(
    results: dict[str, dict[str, Any]],
    series: dict[tuple[str, str, str], list[float]],
    st: Setting,
    days: int,
    docs: Path,
) -> list[str]:
    """Engines (as GPUs allocated and serving) against demand per region, one figure per
    policy, into `docs`; the file names."""
    plt = pyplot()
    names = []
    for name, res in results.items():
        fig, axes = plt.subplots(
            len(st.regions), 1, figsize=(12, 2.6 * len(st.regions)), sharex=True
        )
        minutes = np.array([s[0] for s in res["samples"]])
        for ax, r in zip(axes, st.regions, strict=True):
            demand = sum(np.array(series[m, r, c]) for m in st.models for c in CLASSES)
            demand = demand[: days * 1440]
            hours = np.arange(demand.size) / 60
            ax.plot(hours, demand / 1000, lw=0.4, color="0.6", label="demand (k prompt tok/s)")
            ax2 = ax.twinx()
            for at, lw, color, label in ((1, 0.9, "C3", "GPUs allocated"),
                                         (2, 0.7, "C0", "GPUs serving")):  # fmt: skip
                counts = [sample[at].get(r, 0) for sample in res["samples"]]
                ax2.step(minutes / 60, counts, where="post", lw=lw, color=color, label=label)
            ax.set_ylabel(f"{r}\nk tok/s")
            ax2.set_ylabel("GPUs")
            if r == st.regions[0]:
                ax.legend(loc="upper left", fontsize=8)
                ax2.legend(loc="upper right", fontsize=8)
        axes[-1].set_xlabel("hour")
        axes[0].set_title(
            f"{name}: {res['gpu_hours']:.0f} GPU-hours, SLO attainment "
            f"{100 * res['slo_attainment']:.2f}%"
        )
        path = docs / f"planner_{name}.png"
        save_figure(fig, path)
        names.append(path.name)
    return names


def _of(smooth_min: int) -> str:
    return "per-minute values" if smooth_min == 1 else f"{smooth_min}-minute means"
