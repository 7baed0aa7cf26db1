"""docs/ROUTING.md and its plot from the measurements of routing_bench.py and routing_live.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks._common import pyplot, save_figure

POLICY_ORDER = ("predicted-latency", "round-robin", "jsq", "least-tokens", "power-of-two",
                "least-outstanding")  # fmt: skip


def _plot(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fleets = sorted({r["engines"] for r in doc["results"]})
    fig, axes = plt.subplots(2, len(fleets), figsize=(5 * len(fleets), 7), squeeze=False)
    for col, n in enumerate(fleets):
        for row, (key, label) in enumerate((("mean_e2e", "mean"), ("p99_e2e", "p99"))):
            ax = axes[row][col]
            for policy in POLICY_ORDER:
                pts = [(r["load"], r[key]) for r in doc["results"]
                       if r["engines"] == n and r["policy"] == policy]  # fmt: skip
                if pts:
                    width = 2.5 if policy == POLICY_ORDER[0] else 1.2
                    xs, ys = [p[0] * 100 for p in pts], [p[1] for p in pts]
                    ax.plot(xs, ys, marker="o", label=policy, linewidth=width)
            ax.set_title(f"{n} engines: {label} end-to-end latency")
            ax.set_xlabel("load (% of fleet capacity)")
            ax.set_ylabel("seconds")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)


def _table(doc: dict[str, Any], n: int) -> list[str]:
    rows = [r for r in doc["results"] if r["engines"] == n]
    lines = [
        "| load | policy | mean e2e (s) | vs RR | p99 e2e (s) | mean TTFT (ms) | p99 TTFT (ms) "
        "| mean TPOT (ms) | p99 TPOT (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in rows}):
        at = {r["policy"]: r for r in rows if r["load"] == load}
        rr = at["round-robin"]["mean_e2e"]
        for policy in POLICY_ORDER:
            r = at.get(policy)
            if r is None:
                continue
            name = f"**{policy}**" if policy == POLICY_ORDER[0] else policy
            lines.append(
                f"| {load:.0%} | {name} | {r['mean_e2e']:.2f} | {r['mean_e2e'] / rr - 1:+.1%} "
                f"| {r['p99_e2e']:.2f} | {r['mean_ttft'] * 1e3:.0f} | {r['p99_ttft'] * 1e3:.0f} "
                f"| {r['mean_tpot'] * 1e3:.1f} | {r['p99_tpot'] * 1e3:.1f} |"
            )
    return lines


def _live(path: Path) -> list[str]:
    if not path.exists():
        return ["Not run yet: `make bench-routing-live` writes it."]
    lines: list[str] = []
    for live in json.loads(path.read_text())["runs"]:
        lines += [
            f"Measured {live['date']} on {live['machine']}: the gateway in-process "
            f"(`build_app`) on {live['engines']} simulated H100 engines with `time_scale = "
            f"{live['time_scale']}`, {live['requests']} requests of the evaluation slice "
            f"replayed at {live['rate']:.1f} requests/s of modelled time ({live['load']:.0%} "
            "of the fleet's capacity measured in the simulator) by an open-loop async client "
            "(aiohttp, not streamed: relaying every token of thousands of streams would make "
            "the 2 shared cores the bottleneck, so no TTFT here). Latencies are wall-clock "
            "seconds on this machine divided by the time scale, to read as modelled GPU seconds.",
            "",
            "| policy | mean e2e (s) | vs RR | p99 e2e (s) | errors |",
            "|---|---|---|---|---|",
        ]
        rr = next(r["mean_e2e"] for r in live["results"] if r["policy"] == "round-robin")
        for r in live["results"]:
            lines.append(
                f"| {r['policy']} | {r['mean_e2e']:.2f} | {r['mean_e2e'] / rr - 1:+.1%} "
                f"| {r['p99_e2e']:.2f} | {r['errors']} |"
            )
        lines.append("")
    return lines


def _live_note(doc: dict[str, Any], path: Path) -> str:
    if not path.exists():
        return ""
    sim = [r["mean_e2e"] for r in doc["results"]
           if (r["engines"], r["load"], r["policy"]) == (4, 0.7, "round-robin")]  # fmt: skip
    live = [
        f"{r['mean_e2e']:.2f} s at time scale {run['time_scale']:g}"
        for run in json.loads(path.read_text())["runs"]
        for r in run["results"]
        if r["policy"] == "round-robin"
    ]
    return (
        "Live latencies are higher than the simulator's at the same load: the gateway, the "
        "engines and the client share two busy cores, so engine steps run late (round robin: "
        + (f"{sim[0]:.2f} s mean in the simulator on the whole slice; " if sim else "")
        + "live, from an empty fleet over the first seconds of it, "
        + ", ".join(live)
        + "). The router's gain shrinks with that distortion, since it prices steps at the "
        "modelled speed, and grows back as the engines get more CPU headroom."
    )


def _targets(doc: dict[str, Any]) -> list[str]:
    lines = [
        "| engines | load | mean vs RR (target <= -11%) | mean vs best baseline | "
        "p99 vs jsq (target <= 0) |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({r["engines"] for r in doc["results"]}):
        for load in sorted({r["load"] for r in doc["results"]}):
            at = {r["policy"]: r for r in doc["results"]
                  if r["engines"] == n and r["load"] == load}  # fmt: skip
            ours = at["predicted-latency"]
            best = min(r["mean_e2e"] for k, r in at.items() if k != "predicted-latency")
            lines.append(
                f"| {n} | {load:.0%} | {ours['mean_e2e'] / at['round-robin']['mean_e2e'] - 1:+.1%} "
                f"| {ours['mean_e2e'] / best - 1:+.1%} "
                f"| {ours['p99_e2e'] / at['jsq']['p99_e2e'] - 1:+.1%} |"
            )
    return lines


def write_report(doc: dict[str, Any], out: Path) -> None:
    _plot(doc, out / "routing_latency.png")
    pred = doc["predictor"]
    quick = " (a --quick smoke run: small slices)" if doc["quick"] else ""
    md = [
        "# Routing: measured",
        "",
        "Generated by `make bench-routing` (benchmarks/routing_bench.py) and "
        "`make bench-routing-live` (benchmarks/routing_live.py); only measured figures.",
        f"Simulator run {doc['date']} on {doc['machine']}{quick}.",
        "",
        "## How `predicted-latency` decides",
        "",
        "`gateway/latency_router.py`. For each healthy engine of the model it prices, from the "
        "engine's snapshot (the gateway's own in-flight requests, prompt tokens and predicted "
        "output tokens there; the running, waiting and KV gauges scraped from its `/metrics`) "
        "and the roofline perf model of its GPU and model (docs/ENGINE.md, in closed form):",
        "",
        "- the request's own latency there: prefill queued ahead, its own chunked prefill "
        "sharing steps with the decodes, a wait for a sequence slot or KV room when the engine "
        "is full, and its expected output (the log-normal mean of the predicted median and 0.9 "
        "quantile) times the decode step time with it in the batch, stretched by 1 / (1 - the "
        "share of the engine's time its recent prefill takes) (prompt tokens the gateway sent "
        "there, decayed over 30 s, at the perf model's prefill cost; capped at 0.5), because "
        "chunked prefill rides in the same steps as the decodes;",
        "- the delay it adds to the streams running there: its prefill's extra step time "
        "(prefill-heavy mixing), and the longer step its KV reads cause for each of its decode "
        "steps (decode-heavy mixing), both weighted 0.5. The weights, the 30 s window and the "
        "0.5 cap were chosen in the simulator on rows 3,000 to 7,000 of the trace (inside the "
        "training part, 4 engines, 70% and 90% load), never on the evaluation slice.",
        "",
        "It picks the least total. With preferred regions (config or `X-Fairway-Regions`) it "
        "first keeps to the first preferred region whose utilisation (mean of max(KV use, "
        "sequence slots in use)) is under `region_threshold`, else the least utilised region "
        "(SageServe's short-term rule). Baselines: `round-robin`; `jsq` (fewest running + "
        "waiting as the engine reports them); `least-tokens` (fewest prompt + predicted output "
        "tokens in flight); `power-of-two` (two random engines, fewer in flight); "
        "`least-outstanding` (fewest requests in flight from the gateway; the previous default).",
        "",
        "## Workload (what is real, what is synthetic)",
        "",
        "Arrival times and the base prompt and output token counts are the Azure LLM "
        "conversation trace (2023-11-16, one hour, 19,366 requests). Tenants, applications, "
        "message bodies and request parameters are synthetic (benchmarks/routing_workload.py): "
        "each row goes, by a hash of its index, to one of five applications that rescale its "
        "tokens: chat (35%, as traced, some clients cap `max_tokens`), agent (15%, outputs "
        "x2.5, tools), summarise (20%, prompts x2.5, outputs x0.25), classify (15%, outputs of "
        "a few tokens, JSON format) and writer (15%, short prompts, outputs x3). The last user "
        'message carries a synthetic hint of the length ("answer briefly", "about 600 '
        "words\"), informative as real asks are, but by construction: the predictor's "
        "accuracy below is on this synthetic signal, not a claim about real traffic.",
        "",
        f"The first 60% of the trace ({doc['train_rows']:,} requests) is the training log; "
        f"routing is evaluated on the last 40% ({doc['eval_rows']:,} requests), which the "
        "model never saw. Engines: H100, Llama 3.1 8B, the perf model of docs/ENGINE.md, "
        "256 sequences, 2,048 batched tokens. Capacity (flooded fleet, least-outstanding): "
        + ", ".join(f"{n} engines {c:.1f} req/s" for n, c in doc["capacity"].items())
        + ". Loads are that capacity times 50/70/90%. On 16 engines the slice is replayed as "
        "four superposed copies (shifted in time, each with its own application draw).",
        "",
        "## Length predictor",
        "",
        f"`fairway train-router` on the training log, last 20% held out "
        f"(trained in {doc['train_s']:.0f} s, 2 x 200 rounds):",
        "",
        "| predictor | MAE (tokens) | bucket accuracy | p90 coverage |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['mae']:.1f} | {v['bucket_accuracy']:.1%} | {v['coverage']:.1%} |"
            for k, v in pred.items()
        ),
        "",
        "Buckets: <32, <64, <128, <256, <512, <1024, more tokens. Coverage: share of requests "
        "whose real length is at most the predicted upper (0.9) quantile; the baselines' upper "
        "is their training 0.9 quantile.",
        "",
        "Prediction cost per request (features with the application's history, then both "
        "boosters on one row), microseconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in doc["predict_us"].items())
        + ".",
        "",
        "## Routing in the cluster simulator",
        "",
        "![mean and p99 latency by load](routing_latency.png)",
        "",
    ]
    md += ["### Against the targets", "", *_targets(doc), ""]
    for n in sorted({r["engines"] for r in doc["results"]}):
        md += [f"### {n} engines", "", *_table(doc, n), ""]
    md += [
        "Scraped gauges (running, waiting, KV use) are fresh at every decision in the "
        "simulator, which favours jsq; the gateway's own in-flight counts are exact in both.",
        "",
        "## Decision cost",
        "",
        "One `choose()` over 16 engines with mixed load (best of 5 x 20,000 calls), "
        "microseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["decision_us"].items()) + ".",
        "",
        "## Live run through the gateway",
        "",
        *_live(out / "routing_live.json"),
        _live_note(doc, out / "routing_live.json"),
        "",
        "## Limits",
        "",
        "- The predictor's features are synthetic (see Workload); its MAE here says the "
        "pipeline learns what the features carry, not how well real traffic can be predicted.",
        "- In the simulator the scraped gauges are fresh at every decision; the gateway scrapes "
        "every `health_interval_s`. Predicted-latency leans on the gateway's own in-flight "
        "counts, which are exact in both.",
        "- The prediction cost is mostly LightGBM's per-call overhead for one row (two "
        "boosters), not the trees; it is paid once per request, on the event loop.",
        "- Predicted-latency trades TTFT for end-to-end latency: its mean and p99 TTFT are "
        "higher than the baselines' (it packs short requests where long ones are not), while "
        "its mean and p99 end-to-end latency and its decode speed for long answers are better.",
        "- The live run is short, open-loop and non-streamed, on a 2-core machine shared with "
        "other work: a check that the gateway path behaves as the simulator says, not a "
        "benchmark of its own.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "make bench-routing        # simulator: predictor, capacity, 36 runs, decision cost",
        "make bench-routing-live   # live replay, 4 engines, time_scale 1, 60 s of arrivals",
        "# the same, engines at half speed so that this machine's CPU distorts less:",
        ".venv/bin/python benchmarks/routing_live.py --seconds 40 --time-scale 2 \\",
        "    --policies predicted-latency,round-robin",
        "```",
        "",
    ]
    (out / "ROUTING.md").write_text("\n".join(md))
