"""docs/BENCHMARKS.md's gateway overhead section from the results of
benchmarks/gateway_overhead.py: the setting, the summary against the targets, and one table per
phase (each proxy's figures beside going straight to the engines)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def fmt(v: float) -> str:
    if v != v:  # NaN: nothing completed
        return "n/a"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| clients | target | req/s | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms "
            "| added TTFT p50 ms | proxy CPU ms/req | errors |")  # fmt: skip
    out = [head, "|" + "---|" * 10]
    direct = {r["concurrency"]: r for r in rows if r["target"] == "direct"}
    for r in rows:
        base = direct.get(r["concurrency"])
        added = "" if r["target"] == "direct" or base is None else fmt(
            r["ttft_p50_ms"] - base["ttft_p50_ms"]
        )  # fmt: skip
        out.append(
            f"| {r['concurrency']} | {r['target']} | {fmt(r['rps'])} | {fmt(r['ttft_p50_ms'])} "
            f"| {fmt(r['ttft_p99_ms'])} | {fmt(r['e2e_p50_ms'])} | {fmt(r['e2e_p99_ms'])} "
            f"| {added} | {'' if r['target'] == 'direct' else fmt(r['cpu_ms'])} | {r['errors']} |"
        )
    return out


def write_report(data: dict[str, Any], phases: Mapping[str, str], output: Path) -> None:
    """Write the page; the sections other benchmarks keep in it (between `<!-- name -->` and
    `<!-- /name -->`: scale, replicas) stay as they are."""
    doc = render(data, phases)
    print("\n".join(doc))
    text = output.read_text() if output.exists() else ""
    pattern = re.compile(r"<!-- (\w[\w-]*) -->.*?<!-- /\1 -->", re.S)
    sections = [m.group(0) for m in pattern.finditer(text)]
    output.write_text("\n".join(doc) + "\n" + "".join(f"\n{x}\n" for x in sections))
    print(f"\nwrote {output}")


def render(data: dict[str, Any], phases: Mapping[str, str]) -> list[str]:
    """The page, with one table for each of `phases` (name: what it runs), in their order."""
    results: dict[str, list[dict[str, Any]]] = data["results"]
    seconds = data["seconds"]
    doc = [
        "# Benchmarks",
        "",
        "## Gateway overhead",
        "",
        f"Measured {data['measured_at']} on this machine: {data['machine']}.",
        "",
        "The engines, the proxy under test and the load generator all share its cores, so",
        "compare the rows of one run with each other; the absolute figures are this machine's,",
        f"not a GPU server's. Command: `{data['command']}` (raw results in",
        "`docs/gateway_overhead.json`; `--from-json` re-renders this page from them).",
        "",
        "Two simulated engines (`fairway sim`, one process each); each target in front of both;",
        "a closed loop of C clients, each sending one streaming chat request after another",
        "(in the paced phase after a random pause of up to 20 ms, so that arrivals do not lock",
        "onto the engines' steps: without it, latency added in front of an engine can shorten",
        f"the time to first token), for {seconds:.0f} s after 2 s of warm-up per cell "
        "(`benchmarks/loadgen.py`);",
        f"{data.get('rounds', 1)} rounds with the targets interleaved, each figure the median "
        "of the rounds.",
        "Every request that finishes after the warm-up counts. TTFT is the time to the first",
        "SSE event; e2e to `data: [DONE]`. `direct` spreads requests over the engines round",
        "robin from the client. Proxy CPU is the proxy process's user",
        "and system time over the cell divided by the requests it served. LiteLLM runs with one",
        "worker, no database and no callbacks; vllm-router with round robin. `fairway-gc-off`",
        "is Fairway with `[server] tune_gc = false`, to show what that setting is worth.",
        "",
        "### Summary",
        "",
        *summary(results),
        "",
        "Added TTFT at 64 paced streams is a difference of two ~18 ms medians on a shared",
        "2-core machine: from one full run to the next it has moved by a few milliseconds",
        "(each run's rounds are interleaved to limit drift), so read it with that spread.",
    ]
    for name, what in phases.items():
        doc += ["", f"### {name}: {what}", "", *table(results[name])]
    return doc


def summary(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The figures the foundation issue sets targets for, read off the tables."""

    def cell(phase: str, target: str, clients: int) -> dict[str, Any] | None:
        rows = results.get(phase, [])
        return next((r for r in rows if r["target"] == target and r["concurrency"] == clients),
                    None)  # fmt: skip

    out = []
    direct, fairway = cell("paced", "direct", 64), cell("paced", "fairway", 64)
    if direct and fairway:
        added = fairway["ttft_p50_ms"] - direct["ttft_p50_ms"]
        verdict = "met" if added < 2 else "not met"
        p99 = fairway["ttft_p99_ms"] - direct["ttft_p99_ms"]
        out.append(f"- Added p50 TTFT at 64 paced streams: {added:.2f} ms (target under 2 ms: "
                   f"{verdict}); added p99 {p99:+.2f} ms.")  # fmt: skip
    for phase in ("paced", "saturated"):
        fw = cell(phase, "fairway", 512)
        if fw:
            out.append(f"- Errors through Fairway at 512 {phase} streams: {fw['errors']} "
                       "(target: none).")  # fmt: skip
    names = sorted({r["target"] for r in results.get("saturated", [])} - {"direct"})
    for clients in (64, 512):
        base = cell("saturated", "direct", clients)
        if not base or not base["rps"]:
            continue
        parts = []
        for name in names:
            r = cell("saturated", name, clients)
            if r:
                parts.append(f"{name} {r['rps']:.0f} req/s ({r['rps'] / base['rps']:.2f}x)")
        out.append(f"- Highest sustained rate, {clients} saturated streams, against direct "
                   f"{base['rps']:.0f} req/s: " + ", ".join(parts) + ".")  # fmt: skip
    fw, vr = cell("saturated", "fairway", 512), cell("saturated", "vllm-router", 512)
    if fw and vr and vr["rps"]:
        ratio = fw["rps"] / vr["rps"]
        verdict = "met" if ratio >= 1.1 else "not met"
        out.append(f"- Fairway against vllm-router at 512 saturated streams: {ratio:.2f}x "
                   f"(target at least 1.1x: {verdict}).")  # fmt: skip
    off = cell("saturated", "fairway-gc-off", 512)
    if fw and off and off["rps"]:
        out.append(f"- What made the difference: with `[server] tune_gc = false` (Python's "
                   f"garbage-collector defaults) Fairway serves {off['rps']:.0f} req/s at 512 "
                   f"saturated streams at {off['cpu_ms']:.2f} ms of CPU a request, against "
                   f"{fw['rps']:.0f} req/s at {fw['cpu_ms']:.2f} ms with it "
                   f"({fw['rps'] / off['rps']:.2f}x).")  # fmt: skip
    d64, vr64 = cell("paced", "direct", 64), cell("paced", "vllm-router", 64)
    if d64 and vr64 and fairway:
        out.append(f"- Added p50 TTFT at 64 paced streams, vllm-router: "
                   f"{vr64['ttft_p50_ms'] - d64['ttft_p50_ms']:.2f} ms; Fairway "
                   f"{fairway['ttft_p50_ms'] - d64['ttft_p50_ms']:.2f} ms.")  # fmt: skip
    parts = []
    for name in names:
        r = cell("paced", name, 64)
        if r:
            parts.append(f"{name} {r['cpu_ms']:.2f} ms")
    if parts:
        out.append("- Proxy CPU per request at 64 paced streams (64 tokens each): "
                   + ", ".join(parts) + ".")  # fmt: skip
    return out
