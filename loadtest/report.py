"""Fairness report of a locust run: `python -m loadtest.report RECORDS.jsonl [--weight acme=2]`.

Reads the per-request records the locustfile writes (FAIRWAY_RECORDS) and prints VTC's fairness
metrics and per-tenant TTFT and throughput as markdown tables.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from loadtest.metrics import Record, fairness, per_tenant


def load(path: Path, weights: dict[str, float]) -> list[Record]:
    records = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        records.append(
            Record(r["tenant"], r["arrival"], r["first_token"], r["finish"], r["prompt_tokens"],
                   r["output_tokens"], weights.get(r["tenant"], 1.0), r["status"])
        )  # fmt: skip
    return records


def tables(records: list[Record], window_s: float = 60.0, label: str = "") -> list[str]:
    if not records:
        return ["(no requests recorded)"]
    start = min(r.arrival for r in records)
    end = max(r.arrival for r in records)

    def since(t: float | None) -> float | None:
        return None if t is None else t - start

    rel = [
        Record(r.tenant, r.arrival - start, since(r.first_token), since(r.finish),
               r.prompt_tokens, r.output_tokens, r.weight, r.status)
        for r in records
    ]  # fmt: skip
    f = fairness(rel, 0.0, end - start, window_s)
    duration = end - start
    lines = [
        "| run | max diff | avg diff | Jain | requests | refused | output tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {label} | {f.max_diff:,.0f} | {f.avg_diff:,.0f} | {f.jain:.3f} | {len(rel)} | "
        f"{sum(r.status != 'ok' for r in rel)} | "
        f"{sum(r.output_tokens for r in rel if r.status == 'ok') / duration:,.0f} |",
        "",
        "| run | tenant | requests | served | refused | TTFT p50 s | TTFT p99 s | output tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tenant, s in per_tenant(rel, duration).items():
        lines.append(
            f"| {label} | {tenant} | {s.requests} | {s.ok} | {s.throttled} | {s.ttft_p50:.3f} | "
            f"{s.ttft_p99:.3f} | {s.output_tokens_per_s:,.0f} |"
        )
    return lines


def _weights(pairs: Iterable[str]) -> dict[str, float]:
    out = {}
    for p in pairs:
        name, _, w = p.partition("=")
        out[name] = float(w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--weight", action="append", default=[], help="tenant=weight")
    ap.add_argument("--window", type=float, default=60.0, help="seconds per service window")
    args = ap.parse_args()
    print("\n".join(tables(load(args.records, _weights(args.weight)), args.window, "locust")))


if __name__ == "__main__":
    main()
