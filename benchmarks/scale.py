"""Scale: one gateway process holding thousands of concurrent streams, then a long soak.

Starts simulated engines (`fairway sim`, separate processes) slow enough that each stream
lasts many seconds, and a closed loop of C streaming clients (benchmarks/loadgen.py, its own
process), first straight to the engines and then through one Fairway process:

- hold: C concurrent streams (5,000 by default): the gateway's CPU, its resident memory per
  stream held (RSS under load less RSS idle, over C) and the TTFT it adds (p50, p99, against
  the direct run at the same concurrency);
- soak: a steady load for many minutes (30 by default): RSS sampled every 30 s; its growth
  from the end of the warm-up to the end must stay under 5%.

Writes its section of docs/BENCHMARKS.md with the machine it ran on.

    .venv/bin/python benchmarks/scale.py                       # 5,000 streams, 30-minute soak
    .venv/bin/python benchmarks/scale.py --soak-minutes 2 --streams 1000    # a quick look
    .venv/bin/python benchmarks/scale.py --hold-only    # the hold again; the soak from the JSON

Raw results go to docs/scale.json, each part with the time it was measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import engine_table, free_port, machine, splice_section, toml_table
from gateway_overhead import KEY, KEY_DIGEST, MODEL, PY, ROOT, cpu_seconds, process

DOC = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "scale.json"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fairway_config(engines: list[str], path: Path, slots: int) -> None:
    acme = {"max_concurrent": 0, "apps.chat": {},
            "keys": [{"sha256": KEY_DIGEST, "app": "chat"}]}  # fmt: skip
    tables = [
        toml_table("server", {"backlog": 8192}),
        toml_table("logging", {"level": "warning"}),
        toml_table("fairness", {"max_queue_per_tenant": 100_000}),
        toml_table("tenants.acme", acme),
        *(engine_table("local", MODEL, kind="vllm", url=url, max_running=slots) for url in engines),
    ]
    path.write_text("\n".join(tables) + "\n")


def load(
    urls: list[str], concurrency: int, seconds: float, max_tokens: int, warmup: float
) -> dict[str, Any]:
    cmd = [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--key", KEY, "--model", MODEL,
           "--concurrency", str(concurrency), "--duration", str(seconds),
           "--warmup", str(warmup), "--max-tokens", str(max_tokens),
           "--jitter-ms", "2000", "--timeout", "900"]  # fmt: skip
    for u in urls:
        cmd += ["--url", u]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=warmup + seconds + 900)  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class Sampler(threading.Thread):
    """RSS of `pid` every `every` seconds while the load runs."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.start_at = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append((time.monotonic() - self.start_at, rss_mib(self.pid)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=5000, help="concurrent streams held")
    p.add_argument("--hold-seconds", type=float, default=60.0)
    p.add_argument("--soak-minutes", type=float, default=30.0)
    p.add_argument("--soak-streams", type=int, default=1000)
    p.add_argument("--soak-warmup-minutes", type=float, default=5.0)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--time-scale", type=float, default=10.0, help="slows the engines down")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--hold-only", action="store_true",
                   help="measure the hold only; keep the soak of docs/scale.json")  # fmt: skip
    args = p.parse_args()
    soak: dict[str, Any] | None = None
    if args.hold_only:
        soak = json.loads(RAW.read_text())["soak"]

    slots = -(-args.streams // args.engines) + 64
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        urls: list[str] = []
        with contextlib.ExitStack() as stack:
            for i in range(args.engines):
                port = free_port()
                cmd = [PY, "-m", "gateway.cli", "sim", "--port", str(port), "--model", MODEL,
                       "--time-scale", str(args.time_scale), "--max-num-seqs", str(slots),
                       "--max-batched-tokens", "65536", "--backlog", "8192"]  # fmt: skip
                stack.enter_context(
                    process(cmd, f"http://127.0.0.1:{port}/health", work / f"sim{i}.log")
                )
                urls.append(f"http://127.0.0.1:{port}")
            warm = 20.0
            print(f"direct: {args.streams} streams to {args.engines} engines", file=sys.stderr)
            direct = load(urls, args.streams, args.hold_seconds, args.max_tokens, warm)
            cfg = work / "fairway.toml"
            fairway_config(urls, cfg, slots)
            port = free_port()
            gw_cmd = [PY, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)]
            gw_url = f"http://127.0.0.1:{port}"
            with process(gw_cmd, f"{gw_url}/healthz", work / "fairway.log") as gw:
                load([gw_url], 16, 3.0, 4, 1.0)  # imports, pools and caches warm
                idle = rss_mib(gw.pid)
                sampler = Sampler(gw.pid, 2.0)
                sampler.start()
                cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
                print(f"fairway: {args.streams} streams", file=sys.stderr)
                through = load([gw_url], args.streams, args.hold_seconds, args.max_tokens, warm)
                cpu = (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
                sampler.stop.set()
                held = [r for t, r in sampler.samples if warm <= t <= warm + args.hold_seconds]
                peak = max(held, default=float("nan"))
                hold = {
                    "streams": args.streams, "idle_rss_mib": idle, "loaded_rss_mib": peak,
                    "rss_kib_per_stream": (peak - idle) * 1024 / args.streams,
                    "cpu_cores": cpu, "direct": direct, "fairway": through,
                    "added_ttft_p50_ms": through["ttft_p50_ms"] - direct["ttft_p50_ms"],
                    "added_ttft_p99_ms": through["ttft_p99_ms"] - direct["ttft_p99_ms"],
                }  # fmt: skip
                hold["measured_at"] = now()
                print(json.dumps(hold, indent=1), file=sys.stderr)
                if soak is None:
                    soak = soak_phase(args, gw.pid, gw_url)
    section = render(args, hold, soak)
    print(section)
    if not args.no_write:
        RAW.write_text(json.dumps({"hold": hold, "soak": soak}, indent=1) + "\n")
        DOC.write_text(splice_section(DOC.read_text() if DOC.exists() else "", "scale", section))
        print(f"wrote {DOC}", file=sys.stderr)


def soak_phase(args: argparse.Namespace, pid: int, gw_url: str) -> dict[str, Any]:
    """The soak: a steady load for many minutes with RSS sampled every 30 s."""
    soak_s = args.soak_minutes * 60
    sampler = Sampler(pid, 30.0)
    sampler.start()
    print(f"soak: {args.soak_streams} streams for {args.soak_minutes:g} min",
          file=sys.stderr)  # fmt: skip
    soaked = load([gw_url], args.soak_streams, soak_s, args.max_tokens, 10.0)
    sampler.stop.set()
    warm_s = args.soak_warmup_minutes * 60
    after = [(t, r) for t, r in sampler.samples if t >= warm_s]
    start_rss = after[0][1] if after else float("nan")
    end_rss = after[-1][1] if after else float("nan")
    soak = {
        "streams": args.soak_streams, "minutes": args.soak_minutes,
        "warmup_minutes": args.soak_warmup_minutes, "rss_after_warmup_mib": start_rss,
        "rss_end_mib": end_rss, "rss_max_mib": max(r for _, r in after) if after else
        float("nan"), "growth_pct": (end_rss / start_rss - 1) * 100,
        "samples": sampler.samples, "load": soaked,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in soak.items() if k != "samples"}, indent=1),
          file=sys.stderr)  # fmt: skip
    soak["measured_at"] = now()
    return soak


def render(args: argparse.Namespace, hold: dict[str, Any], soak: dict[str, Any]) -> str:
    d, f = hold["direct"], hold["fairway"]
    when = hold["measured_at"]
    if soak.get("measured_at", when) != when:
        when = f"hold {when}, soak {soak['measured_at']}"
    samples = ", ".join(
        f"{r:.0f}" for _, r in soak["samples"][:: max(1, len(soak["samples"]) // 12)]
    )
    lines = [
        "<!-- scale -->",
        "## Scale: thousands of streams in one process, and a soak",
        "",
        f"`.venv/bin/python benchmarks/scale.py` ({when}; {machine()}). One Fairway process; "
        f"{args.engines} simulated engines (`fairway sim --time-scale {args.time_scale:g}`, "
        f"{args.max_tokens} output tokens a stream) and the load generator are processes of "
        "their own, and all of them share this machine's two cores.",
        "",
        f"**Hold {hold['streams']:,} concurrent streams** ({args.hold_seconds:g} s measured after "
        "20 s of warm-up):",
        "",
        "| | direct to engines | through Fairway |",
        "|---|---:|---:|",
        f"| requests per second | {d['rps']:.0f} | {f['rps']:.0f} |",
        f"| TTFT p50 / p99 (ms) | {d['ttft_p50_ms']:.0f} / {d['ttft_p99_ms']:.0f} | "
        f"{f['ttft_p50_ms']:.0f} / {f['ttft_p99_ms']:.0f} |",
        f"| end-to-end p50 (ms) | {d['e2e_p50_ms']:.0f} | {f['e2e_p50_ms']:.0f} |",
        f"| errors | {d['errors']} | {f['errors']} |",
        "",
        f"Fairway added {hold['added_ttft_p50_ms']:.0f} ms TTFT at p50 and "
        f"{hold['added_ttft_p99_ms']:.0f} ms at p99, used {hold['cpu_cores']:.2f} cores, and "
        f"held {hold['idle_rss_mib']:.0f} MiB idle, {hold['loaded_rss_mib']:.0f} MiB under "
        f"load: **{hold['rss_kib_per_stream']:.1f} KiB per stream**.",
        "",
        f"**Soak**: {soak['streams']:,} streams for {soak['minutes']:g} minutes "
        f"({soak['load']['requests']:,} requests, {soak['load']['errors']} errors). RSS "
        f"{soak['rss_after_warmup_mib']:.1f} MiB after the {soak['warmup_minutes']:g}-minute "
        f"warm-up, {soak['rss_end_mib']:.1f} MiB at the end (max {soak['rss_max_mib']:.1f}): "
        f"**{soak['growth_pct']:+.1f}%** (target: under 5%). Samples (MiB): {samples}.",
        "<!-- /scale -->",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
