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
        "| mean TPOT (ms) | p99 TPOT (ms) | queued |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
                f"| {r['mean_tpot'] * 1e3:.1f} | {r['p99_tpot'] * 1e3:.1f} | {r['queued']} |"
            )
    return lines


def _gain(rows: dict[str, dict[str, Any]], key: str = "mean_e2e") -> float:
    """Predicted-latency against round robin, as a relative change."""
    return float(rows["predicted-latency"][key] / rows["round-robin"][key] - 1)


def _frontend(doc: dict[str, Any]) -> list[str]:
    rows = doc.get("frontend") or []
    if not rows:
        return []
    n, load = rows[0]["engines"], rows[0]["load"]
    lines = [
        "### What the gate core changes",
        "",
        f"{n} engines at {load:.0%}, the same arrivals, with the gate core's in-flight limits "
        "lifted (every request goes straight to an engine, which queues it) and the gauges "
        "read at every decision, then each put back:",
        "",
        "| gate core | policy | mean e2e (s) | vs RR | p99 e2e (s) | mean TTFT (ms) "
        "| mean TPOT (ms) | queued |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        at = {r["policy"]: r for r in rows if r["variant"] == variant}
        for policy in ("predicted-latency", "round-robin"):
            r = at[policy]
            lines.append(
                f"| {variant} | {policy} | {r['mean_e2e']:.2f} "
                f"| {r['mean_e2e'] / at['round-robin']['mean_e2e'] - 1:+.1%} "
                f"| {r['p99_e2e']:.2f} | {r['mean_ttft'] * 1e3:.0f} | {r['mean_tpot'] * 1e3:.1f} "
                f"| {r['queued']} |"
            )
    return [*lines, ""]


def _runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"]
    return [r for r in runs if all("sim" in x for x in r["results"])]


def _live(path: Path) -> list[str]:
    runs = _runs(path)
    if not runs:
        return ["Not run yet: `make bench-routing-live` writes it."]
    lines: list[str] = []
    for run in runs:
        every = run["stream_every"]
        lines += [
            f"Measured {run['date']} on {run['machine']}; **the gateway, the simulated engines "
            "and the load generator share this machine's 2 cores**. The gateway runs "
            f"in-process (`build_app`) on {run['engines']} simulated H100 engines with "
            f"`time_scale = {run['time_scale']:g}`; {run['requests']} requests of the "
            f"evaluation slice ({run['seconds']:g} s of modelled arrivals from an empty fleet) "
            f"are replayed at {run['rate']:.1f} requests/s of modelled time ({run['load']:.0%} "
            "of the fleet's capacity measured in the simulator) by an open-loop aiohttp client. "
            f"One request in {every} is streamed, for TTFT and TPOT at the client; the others "
            "are not, since relaying every token of thousands of streams would make the CPU the "
            "bottleneck. Live latencies are wall-clock seconds divided by the time scale, to "
            "read as modelled GPU seconds. *sim* is the same slice, on the same config, through "
            "the gate core in the cluster simulator, its gauges scraped every "
            f"{run['health_interval_s'] / run['time_scale']:g} s of modelled time (the live "
            "gateway's health interval in wall-clock seconds over the time scale). TTFT and "
            "TPOT are over the streamed requests in both.",
            "",
            "| policy | mean e2e live (s) | sim (s) | vs RR live | sim | p99 e2e live (s) "
            "| sim (s) | mean TTFT live (ms) | sim (ms) | mean TPOT live (ms) | sim (ms) "
            "| errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        by = {r["policy"]: r for r in run["results"]}
        rr = by.get("round-robin")
        for policy in POLICY_ORDER:
            r = by.get(policy)
            if r is None:
                continue
            lv, sm = r["live"], r["sim"]
            vs = "-"
            if rr is not None:
                vs = (f"{lv['mean_e2e'] / rr['live']['mean_e2e'] - 1:+.1%} "
                      f"| {sm['mean_e2e'] / rr['sim']['mean_e2e'] - 1:+.1%}")  # fmt: skip
            lines.append(
                f"| {policy} | {lv['mean_e2e']:.2f} | {sm['mean_e2e']:.2f} | {vs} "
                f"| {lv['p99_e2e']:.2f} | {sm['p99_e2e']:.2f} "
                f"| {lv['mean_ttft'] * 1e3:.0f} | {sm['mean_ttft'] * 1e3:.0f} "
                f"| {lv['mean_tpot'] * 1e3:.1f} | {sm['mean_tpot'] * 1e3:.1f} | {lv['errors']} |"
            )
        lag = [r["live"] for r in run["results"]]
        lines += [
            "",
            "The client's event loop, which the gateway and the engines' step timers share, "
            "woke late by "
            + ", ".join(
                f"{x['mean_loop_lag_s'] * 1e3:.1f} ms mean ({x['p99_loop_lag_s'] * 1e3:.0f} ms "
                f"p99) under {r['policy']}"
                for r, x in zip(run["results"], lag, strict=True)
            )
            + f", against a {run['lag_tick_s'] * 1e3:g} ms tick; requests left "
            + ", ".join(f"{x['mean_send_lag_s'] * 1e3:.1f}" for x in lag)
            + " ms late on average.",
            "",
        ]
    return lines


def _gap(doc: dict[str, Any], path: Path) -> list[str]:
    """Predicted-latency against round robin, step by step from the simulator's setting of
    the benchmark to the live gateway."""
    steps: list[tuple[str, float | None, float | None, float | None]] = []
    front = doc.get("frontend") or []
    for variant in dict.fromkeys(r["variant"] for r in front):
        at = {r["policy"]: r for r in front if r["variant"] == variant}
        steps.append((f"simulator, benchmark slice: {variant}", _gain(at),
                      _gain(at, "mean_ttft"), _gain(at, "mean_tpot")))  # fmt: skip
    for run in _runs(path):
        by = {r["policy"]: r for r in run["results"]}
        if "predicted-latency" not in by or "round-robin" not in by:
            continue
        ts = run["time_scale"]
        for side in ("sim", "live"):
            at = {k: v[side] for k, v in by.items()}
            where = "simulator" if side == "sim" else "live gateway"
            steps.append((f"{where}, live slice, time scale {ts:g}", _gain(at),
                          _gain(at, "mean_ttft"), _gain(at, "mean_tpot")))  # fmt: skip
    if not steps:
        return []
    lines = [
        "| setting | mean e2e PL vs RR | mean TTFT PL vs RR | mean TPOT PL vs RR |",
        "|---|---|---|---|",
    ]
    for label, e2e, ttft, tpot in steps:
        cells = " | ".join("-" if v is None else f"{v:+.1%}" for v in (e2e, ttft, tpot))
        lines.append(f"| {label} | {cells} |")
    return [*lines, ""]


def _explain(doc: dict[str, Any], path: Path) -> list[str]:
    """Where the difference between the simulator's gain and the live one comes from, in the
    figures above."""
    front = doc.get("frontend") or []
    runs = [
        r
        for r in _runs(path)
        if r.get("jitter")
        and {"predicted-latency", "round-robin"} <= {x["policy"] for x in r["results"]}
    ]
    variants = list(dict.fromkeys(r["variant"] for r in front))
    if len(variants) < 3 or not runs:
        return []
    gains = [_gain({r["policy"]: r for r in front if r["variant"] == v}) for v in variants]
    queued = max(r["queued"] for r in front)
    parts = []
    for run in runs:
        by = {r["policy"]: r for r in run["results"]}
        live = _gain({k: v["live"] for k, v in by.items()})
        sim = _gain({k: v["sim"] for k, v in by.items()})
        jit = [j["mean_e2e"] for j in run["jitter"]]
        rr_live, rr_sim = by["round-robin"]["live"], by["round-robin"]["sim"]
        parts.append((run, live, sim, min(jit), max(jit), rr_live, rr_sim))
    first = parts[0]
    ms = int(first[0]["jitter_s"] * 1e3)
    sims = "; ".join(f"{p[2]:+.1%} with exact arrival times and {p[3]:+.1%} to {p[4]:+.1%} "
                     f"with each delayed by 0 to {ms} ms at time scale {p[0]['time_scale']:g}"
                     for p in parts)  # fmt: skip
    lives = ", ".join(f"{p[1]:+.1%} at time scale {p[0]['time_scale']:g}" for p in parts)
    outside = max(max(0.0, p[3] - p[1], p[1] - p[4]) for p in parts)
    rr = max(abs(p[5]["mean_e2e"] / p[6]["mean_e2e"] - 1) for p in parts)
    ttft = [(p[5]["mean_ttft"] - p[6]["mean_ttft"]) * 1e3 for p in parts]
    return [
        "On the benchmark slice the gate core's in-flight limits change nothing at this load "
        f"({queued} requests queued), while gauges 2 s old take predicted-latency from "
        f"{gains[1]:+.1%} to {gains[2]:+.1%} against round robin: it counts the gateway's own "
        "requests at an engine from the ledger, fresh, and of the scraped running and waiting "
        "requests only those beyond what the gateway had there at the scrape, so the requests "
        "that ended since the scrape no longer weigh on it; the waiting count it prices queued "
        "prefill with is still as scraped (at most the requests it counts there). That is the "
        "frontend's share "
        "of the difference between a simulator that routed straight to engines with fresh "
        f"gauges ({gains[0]:+.1%}) and the live gateway. On the live run's slice (its first "
        f"{first[0]['seconds']:g} s of arrivals, from an empty fleet) the simulator gives "
        f"{sims}: one slice's gain moves by a few points with millisecond timing, which is the "
        f"slice's share. Live, the gateway measures {lives}, within {outside * 100:.1f} points "
        "of the simulator's range, while round robin's mean end-to-end latency live is within "
        f"{rr:.1%} of the simulator's and its mean TTFT "
        + " and ".join(f"{t:.0f}" for t in ttft)
        + " ms higher, the HTTP hops through the gateway and the engines' servers that the "
        "simulator does not have. What is left for the simulator itself is no larger than its "
        "own spread on one slice.",
        "",
    ]


def _staleness(doc: dict[str, Any]) -> list[str]:
    """The Limits entry on the gauges' age, with the ablation's figures."""
    front = doc.get("frontend") or []
    variants = list(dict.fromkeys(r["variant"] for r in front))
    if len(variants) < 3:
        return []
    fresh, stale = (_gain({r["policy"]: r for r in front if r["variant"] == v})
                    for v in variants[1:3])  # fmt: skip
    return [
        "- Predicted-latency reads other clients' load at an engine from its gauges, as of the "
        "last scrape: the scraped running + waiting count less what the gateway had in flight "
        "there at the scrape (its own requests it counts from the ledger, fresh). The waiting "
        "and KV gauges it reads as scraped. With gauges 2 s old it gains "
        f"{stale:+.1%} against round robin, {fresh:+.1%} with fresh ones (What the gate core "
        "changes, above).",
    ]


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
        "`gateway/routing/latency.py`. For each healthy engine of the model it prices, from the "
        "engine's snapshot (the gateway's own in-flight requests, prompt tokens and predicted "
        "output tokens there; the running, waiting and KV gauges scraped from its `/metrics`, "
        "with what the gateway had in flight there at the scrape, so that the scraped requests "
        "beyond it count as other clients' load) and the roofline perf model of its GPU and "
        "model (docs/ENGINE.md, in closed form):",
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
        "256 sequences, 2,048 batched tokens. Capacity (flooded fleet, every request waiting in "
        "the gateway's queue, least-outstanding): "
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
        "Every run goes through the gateway's gate core on the cluster simulator's clock "
        "(`gateway.simulate.GateFrontend`, set up by benchmarks/routing_sim.py as the gateway "
        "sets itself up): admission with OIT (no token buckets are configured, so it throttles "
        "nothing), the WSC queue, where requests wait only while every engine is at the "
        "gateway's in-flight limits (256 requests, and its KV capacity in prompt plus expected "
        "output tokens), the configured router with each engine's performance profile, and the "
        "length service with the trained model. The engines' running, waiting and KV gauges are "
        "scraped every 2 simulated seconds, the gateway's default `health_interval_s`; the "
        "gateway's own in-flight counts are exact at every decision. *queued*: requests that "
        "waited in the gateway's queue.",
        "",
        "![mean and p99 latency by load](routing_latency.png)",
        "",
    ]
    md += ["### Against the targets", "", *_targets(doc), ""]
    for n in sorted({r["engines"] for r in doc["results"]}):
        md += [f"### {n} engines", "", *_table(doc, n), ""]
    md += [
        "jsq ranks engines by the running and waiting counts they last reported: between two "
        "scrapes it sends every request to the engine that reported the fewest, hence its TTFT "
        "of seconds.",
        "",
        *_frontend(doc),
        "## Decision cost",
        "",
        "One `choose()` over 16 engines with mixed load (best of 5 x 20,000 calls), "
        "microseconds: " + ", ".join(f"{k} {v:.1f}" for k, v in doc["decision_us"].items()) + ".",
        "",
        "## Live run through the gateway, and the same slice in the simulator",
        "",
        *_live(out / "routing_live.json"),
        "### From the simulator to the live gateway",
        "",
        "Predicted-latency against round robin at 4 engines and 70% load, one change at a "
        "time: the gate core's in-flight limits and the gauges' age on the benchmark slice, "
        "then the live run's slice in the simulator and through the live gateway:",
        "",
        *_gap(doc, out / "routing_live.json"),
        *_explain(doc, out / "routing_live.json"),
        "",
        "## Limits",
        "",
        "- The predictor's features are synthetic (see Workload); its MAE here says the "
        "pipeline learns what the features carry, not how well real traffic can be predicted.",
        *_staleness(doc),
        "- The prediction cost is mostly LightGBM's per-call overhead for one row (two "
        "boosters), not the trees; it is paid once per request, on the event loop.",
        "- Predicted-latency trades TTFT for end-to-end latency: its mean and p99 TTFT are "
        "higher than round robin's (it packs short requests where long ones are not), while "
        "its mean and p99 end-to-end latency are lower.",
        "- The live run is short (a minute of arrivals from an empty fleet), open-loop, one "
        "request in ten streamed, on a 2-core machine that the gateway, the engines and the "
        "load generator share with other work: a check that the gateway path behaves as the "
        "simulator says, not a benchmark of its own. A single slice's predicted-latency gain "
        "moves by a few points with millisecond timing (the jittered simulator runs).",
        "- At a time scale other than 1 the live gateway's clock is wall-clock time, so the "
        "recent prompt rate it prices prefill with is per wall-clock second (half the modelled "
        "rate at time scale 2); the simulator's is per modelled second.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "make bench-routing        # simulator: predictor, capacity, 36 + 6 runs, decision cost",
        "make bench-routing-live   # live replay and the same slice simulated, 4 engines,",
        "                          # time_scale 1, 60 s of arrivals, 5 jittered simulator runs",
        "# the same, engines at half speed:",
        ".venv/bin/python benchmarks/routing_live.py --seconds 40 --time-scale 2 \\",
        "    --policies predicted-latency,round-robin",
        "```",
        "",
    ]
    (out / "ROUTING.md").write_text("\n".join(md))
