"""Tables, plots and docs/FAIRNESS.md for benchmarks/fairness.py."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import extract_section, pyplot, save_figure, splice_section

from loadtest.metrics import Fairness, Record, per_tenant, percentile, service_rates


@dataclass(frozen=True, slots=True)
class Run:
    workload: str
    policy: str  # fcfs | rpm | vtc | wsc | wsc+oit
    records: list[Record]
    fair: Fairness
    duration_s: float
    wall_s: float
    overload_at: float = 0.9


def throughput(run: Run) -> float:
    """Output tokens per second of the requests finished within the workload's duration."""
    done = (
        r.output_tokens for r in run.records if r.finish is not None and r.finish < run.duration_s
    )
    return sum(done) / run.duration_s


def fmt(x: float, nd: int = 0) -> str:
    return "-" if x != x else f"{x:,.{nd}f}"


def fairness_table(runs: list[Run]) -> list[str]:
    lines = [
        "| workload | policy | max diff | avg diff | accumulated diff | Jain | output tok/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        f = r.fair
        lines.append(
            f"| {r.workload} | {r.policy} | {fmt(f.max_diff)} | {fmt(f.avg_diff)} | "
            f"{fmt(f.accumulated_diff)} | {f.jain:.3f} | {fmt(throughput(r))} |"
        )
    return lines


def tenant_table(runs: list[Run]) -> list[str]:
    lines = [
        "| workload | policy | tenant | requests | served | refused | TTFT p50 s | TTFT p99 s "
        "| output tok/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        for tenant, s in per_tenant(r.records, r.duration_s).items():
            lines.append(
                f"| {r.workload} | {r.policy} | {tenant} | {s.requests} | {s.ok} | "
                f"{s.throttled} | {fmt(s.ttft_p50, 3)} | {fmt(s.ttft_p99, 3)} | "
                f"{fmt(s.output_tokens_per_s)} |"
            )
    return lines


def well_behaved_p99(run: Run, abuser: str = "abuser") -> float:
    ttfts = [
        t
        for r in run.records
        if r.tenant != abuser and r.status == "ok" and (t := r.ttft) is not None
    ]
    return percentile(ttfts, 99)


def _find(runs: list[Run], workload: str, policy: str) -> Run:
    return next(r for r in runs if r.workload == workload and r.policy == policy)


def targets(runs: list[Run], seeds: list[Run]) -> tuple[list[str], dict[str, Any]]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    ok_all: dict[str, Any] = {}
    judged = [w for w in dict.fromkeys(r.workload for r in runs) if w != "azure-calm"]
    for w in judged:
        wsc, vtc, fcfs = (_find(runs, w, p) for p in ("wsc", "vtc", "fcfs"))
        a, b, c = wsc.fair.max_diff, vtc.fair.max_diff, fcfs.fair.max_diff
        met = a <= b + 1e-9 and a <= 0.5 * c
        lines.append(
            f"| {w}: WSC max service difference <= VTC's and <= half of FCFS's "
            f"| WSC {fmt(a)}, VTC {fmt(b)}, FCFS {fmt(c)} | {'yes' if met else 'no'} |"
        )
        ratio = throughput(wsc) / throughput(fcfs)
        lines.append(
            f"| {w}: WSC total throughput within 2% of FCFS | {ratio:.4f} x FCFS "
            f"| {'yes' if ratio >= 0.98 else 'no'} |"
        )
        ok_all[w] = {"wsc_vtc_fcfs_max_diff": [a, b, c], "throughput_ratio": ratio}
    if seeds:
        mean = {
            p: sum(r.fair.max_diff for r in seeds + runs if r.workload == "azure-abuse"
                   and r.policy == p) / (1 + sum(r.policy == p for r in seeds))
            for p in ("wsc", "vtc", "fcfs")
        }  # fmt: skip
        met = mean["wsc"] <= mean["vtc"] and mean["wsc"] <= 0.5 * mean["fcfs"]
        lines.append(
            f"| azure-abuse over {1 + len(seeds) // 3} deals of rows to tenants: mean max "
            f"difference, WSC <= VTC and <= half of FCFS | WSC {fmt(mean['wsc'])}, VTC "
            f"{fmt(mean['vtc'])}, FCFS {fmt(mean['fcfs'])} | {'yes' if met else 'no'} |"
        )
        ok_all["azure_seeds_mean_max_diff"] = mean
    calm, abuse = _find(runs, "azure-calm", "wsc+oit"), _find(runs, "azure-abuse", "wsc+oit")
    base, hit = well_behaved_p99(calm), well_behaved_p99(abuse)
    lines.append(
        f"| well-behaved tenants' p99 TTFT under the abuser within 1.2x of their no-abuser run "
        f"(WSC + OIT) | {hit:.3f} s vs {base:.3f} s = {hit / base:.2f}x "
        f"| {'yes' if hit <= 1.2 * base else 'no'} |"
    )
    for p in ("fcfs", "vtc", "wsc"):
        b2, h2 = (
            well_behaved_p99(_find(runs, "azure-calm", p)),
            well_behaved_p99(_find(runs, "azure-abuse", p)),
        )
        lines.append(f"| (same ratio under {p}, for reference) | {h2 / b2:.2f}x | - |")
    ok_all["ttft_ratio"] = hit / base
    return lines, ok_all


def plot_service(runs: list[Run], path: Path, title: str, window_s: float = 10.0) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.2), sharey=True)
    for ax, run in zip(axes, runs, strict=True):
        served, _ = service_rates(run.records, 0.0, run.duration_s, window_s)
        for tenant, rates in sorted(served.items()):
            xs = [(i + 0.5) * window_s for i in range(len(rates))]
            ax.plot(xs, rates, label=tenant, lw=1.2)
        ax.set_title(run.policy)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weighted service / s")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_ttft(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    tenants = sorted({r.tenant for r in runs[0].records})
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        stats = per_tenant(run.records, run.duration_s)
        p99 = [stats[t].ttft_p99 if t in stats else float("nan") for t in tenants]
        xs = [i + k * width for i in range(len(tenants))]
        ax.bar(xs, p99, width, label=f"{run.workload} {run.policy}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tenants))], tenants)
    ax.set_yscale("log")
    ax.set_ylabel("p99 TTFT (s, log)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


def write_report(
    out: Path, runs: list[Run], sweep: list[Run], seeds: list[Run], meta: dict[str, Any]
) -> dict[str, Any]:
    figs = out.parent / "fairness"
    figs.mkdir(parents=True, exist_ok=True)
    for w, title in (("two-clients", "Two clients overloading 1:2"),
                     ("azure-abuse", "Azure mix, one tenant at 10x its share")):  # fmt: skip
        plot_service([r for r in runs if r.workload == w], figs / f"service-{w}.png", title)
    plot_ttft([r for r in runs if r.workload.startswith("azure")], figs / "ttft-azure.png")
    target_lines, summary = targets(runs, seeds)
    calm = well_behaved_p99(_find(runs, "azure-calm", "wsc+oit"))
    abuse_runs = [r for r in runs if r.workload == "azure-abuse" and r.policy == "wsc+oit"]
    sweep_lines = [
        "| overload_at | well-behaved p99 TTFT s | vs no abuser | abuser requests refused "
        "| total output tok/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(abuse_runs + sweep, key=lambda r: r.overload_at):
        p99 = well_behaved_p99(r)
        refused = sum(x.status != "ok" for x in r.records if x.tenant == "abuser")
        sweep_lines.append(
            f"| {r.overload_at:.1f} | {p99:.3f} | {p99 / calm:.2f}x | {refused} | "
            f"{fmt(throughput(r))} |"
        )
    text = TEMPLATE.format(
        date=dt.date.today().isoformat(),
        machine=meta["machine"],
        wall=meta["wall_s"],
        quick=" (--quick: shortened runs)" if meta["quick"] else "",
        mu=meta["capacity_req_s"],
        dur=meta["synthetic_s"],
        speedup=meta["speedup"],
        engines=meta["engines"],
        tpm=meta["share_tokens_per_min"],
        rpm=meta["share_requests_per_min"],
        at=meta["overload_at"],
        targets="\n".join(target_lines),
        fairness="\n".join(fairness_table(runs)),
        sweep="\n".join(sweep_lines),
        tenants="\n".join(tenant_table([r for r in runs if r.workload.startswith("azure")])),
    )
    # Keep the live run's section (benchmarks/fairness_live.py writes it).
    live = extract_section(out.read_text() if out.exists() else "", "live")
    out.write_text(text if live is None else splice_section(text, "live", live))
    summary["meta"] = meta
    (figs / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


TEMPLATE = """# Fairness: FairServe (OIT + WSC) against VTC, FCFS and RPM

Measured {date} on {machine}; the whole evaluation took {wall:.0f} s{quick}.
Reproduce: `make bench-fairness` (= `.venv/bin/python benchmarks/fairness.py`).

Every policy runs as the gateway runs it: `gateway.simulate.GateFrontend` drives the gateway's
own `Admission` (OIT), token buckets, `Dispatcher`, fairness policy and router objects from the
discrete-event cluster simulator (`engines/cluster.py`), whose engines are the simulated
engine's scheduler stepped by the performance model (docs/ENGINE.md). Metrics follow VTC's
artifact (`loadtest/metrics.py`): service = prompt + 2 x output tokens spread over [first
token, finish]; per-tenant weighted service rate in 60 s windows; service difference in a window
= max over tenants j of min(max_k s_k - s_j, demand_j - s_j); its maximum and average over the
windows while tenants send; accumulated difference of total service between backlogged
tenants; Jain's index of each window's service against its weighted max-min fair split. Units:
service units (tokens) per second, accumulated in service units.

## Set-up

- Synthetic workloads (VTC's): one A100 engine serving llama-3.1-8b with the gateway's limit of
  32 requests in flight; it finishes {mu:.2f} requests/s of 256 prompt + 256 output tokens, and
  rates are set against that. *two-clients*: Poisson arrivals at 0.6x and 1.2x capacity (VTC's
  1.5 and 3 req/s); *on-off*: one client at 1.2x all along, one at 1.2x every other minute;
  *weighted*: three clients of weights 1, 2, 4, each at 1x capacity. {dur:.0f} s each.
  `rpm` is given each tenant's weighted share of capacity per minute.
- Azure mix: the 19,366 requests of the Azure LLM conversation trace (real arrival times, prompt
  and output lengths), {speedup:g}x faster, dealt at random to six tenants of equal weight:
  four chat tenants, `agentco` whose rows each open a 4-call interaction (calls 2 s apart, same
  interaction id; it takes every fourth of its rows to keep its share), and `abuser`. *calm*:
  everyone sends its share; *abuse*: `abuser` sends ten times its share (nine jittered copies
  of each of its requests). {engines} H100 engines, 64 in flight each. One tenant's share is
  {tpm:,.0f} tokens and {rpm:,.0f} requests a minute; token buckets (OIT) and `rpm` allow 1.5x
  that. `wsc+oit` is Fairway's configuration: WSC ordering and OIT throttling from
  `overload_at = {at:g}`; the other policies run without buckets.

## Targets

{targets}

## Fairness by workload and policy

{fairness}

Plots: per-tenant service over time, ![two clients](fairness/service-two-clients.png)
![azure abuse](fairness/service-azure-abuse.png) and p99 TTFT by tenant
![ttft](fairness/ttft-azure.png).

## OIT threshold: isolation against throughput (Azure mix with the abuser, WSC + OIT)

OIT refuses over-limit tenants only while the model is overloaded, i.e. while the gateway's
in-flight load reaches `fairness.overload_at` of the engines' limits (or requests wait). A
lower threshold keeps more headroom for tenants within their limits; a higher one lets the
abuser use more of the idle capacity. Tenants within their limits are never refused.

{sweep}

## Per tenant (Azure mix)

{tenants}

## What this does and does not show

- The simulator is the performance model, not a GPU: absolute TTFTs are modelled. The
  comparisons between policies are like for like: same arrivals, same engines, same router.
- The synthetic workloads have fixed lengths, so VTC and WSC (whose per-application
  normalisation is the same for one application) split service almost exactly; FCFS hands each
  tenant service in proportion to its sending rate.
- RPM is exactly fair when its limits match capacity, but not work-conserving: it leaves the
  engine partly idle (lower throughput) and would need retuning whenever capacity changes.
- The live run through the gateway on simulated engines (locust) is in
  [the load-test section](#live-run-through-the-gateway).
"""
