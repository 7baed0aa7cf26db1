"""Live routing run: the real gateway on simulated engines, a trace slice replayed through it.

The gateway is built with `gateway.http.app.build_app` on a config of simulated H100 engines and run
in this process (uvloop), with the length model that routing_bench.py trains (trained here if
missing). An async aiohttp client replays the evaluation slice of the Azure trace (synthetic
tenants and bodies, benchmarks/routing_workload.py) at a share of the fleet's capacity measured
in the simulator, open loop: each request leaves at its trace time whatever the others do.
Bodies carry `sim_output_tokens` so that the engines generate the trace's length while
`max_tokens` keeps the client's meaning. Requests are not streamed: relaying every token of
thousands of streams would make this 2-core machine, not the engines, the bottleneck.

Writes docs/routing_live.json and refreshes docs/ROUTING.md when docs/routing_sim.json exists.

    make bench-routing-live    # or: .venv/bin/python benchmarks/routing_live.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.routing_bench import (  # noqa: E402
    TRAIN_SHARE,
    WORK,
    capacity,
    eval_jobs,
    write_log,
)
from benchmarks.routing_report import write_report  # noqa: E402
from benchmarks.routing_workload import APPS, load_trace, requests  # noqa: E402
from gateway.config.schema import parse  # noqa: E402
from gateway.http.app import build_app  # noqa: E402
from gateway.http.auth import digest  # noqa: E402
from gateway.lengths.train import train_and_report  # noqa: E402
from gateway.obs.logs import configure  # noqa: E402

MODEL = "llama-3.1-8b"


def key(tenant: str, app: str) -> str:
    return f"sk-{tenant}-{app}"


def config(policy: str, engines: int, time_scale: float, model: Path) -> dict[str, Any]:
    tenants: dict[str, Any] = {}
    for a in APPS:
        t = tenants.setdefault(a.tenant, {"weight": 1.0, "apps": {}, "keys": []})
        t["apps"][a.name] = {}
        t["keys"].append({"sha256": digest(key(a.tenant, a.name)), "app": a.name})
    return {
        "server": {"read_timeout_s": 600.0},
        "sim": {"time_scale": time_scale, "seed": 1},
        "logging": {"level": "warning"},
        "routing": {"policy": policy, "model_path": str(model)},
        "tenants": tenants,
        "engines": {"r0": {MODEL: [{"kind": "sim", "gpu": "H100"} for _ in range(engines)]}},
    }


async def replay(policy: str, plan: list[tuple[float, str, dict[str, Any]]],
                 args: argparse.Namespace, model: Path) -> dict[str, Any]:  # fmt: skip
    cfg = parse(config(policy, args.engines, args.time_scale, model))
    runner = web.AppRunner(build_app(cfg), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    lat: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter()

        async def one(t: float, api_key: str, body: dict[str, Any]) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            sent = time.perf_counter()
            headers = {"Authorization": f"Bearer {api_key}"}
            async with http.post(url, json=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    return
            lat.append((time.perf_counter() - sent) / args.time_scale)

        await asyncio.gather(*(one(*p) for p in plan))
    await runner.cleanup()
    lat.sort()
    return {
        "policy": policy,
        "mean_e2e": sum(lat) / len(lat),
        "p99_e2e": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--load", type=float, default=0.7, help="share of simulated capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="modelled seconds of arrivals")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--policies", default="predicted-latency,round-robin,least-outstanding")
    args = ap.parse_args()
    configure("warning")
    rows = load_trace()
    cut = int(len(rows) * TRAIN_SHARE)
    model = WORK / "length-model.json"
    if not model.exists():
        write_log(rows[:cut], WORK / "logs")
        train_and_report([WORK / "logs"], model, rounds=200)
    jobs = eval_jobs(rows[cut:], cut, 1)
    cap = capacity(args.engines, jobs[:4000])
    rate = args.load * cap
    k = (len(jobs) / (jobs[-1].arrival - jobs[0].arrival)) / rate
    plan = []
    for r in requests(rows[cut:], cut):
        t = (r.t - rows[cut].t) * k
        if t > args.seconds:
            break
        body = {**r.body, "sim_output_tokens": r.output_tokens}
        plan.append((t * args.time_scale, key(r.tenant, r.app), body))
    print(f"{len(plan)} requests at {rate:.1f}/s ({args.load:.0%} of {cap:.1f}) on "
          f"{args.engines} engines, time scale {args.time_scale}", flush=True)  # fmt: skip
    results = []
    for policy in args.policies.split(","):
        res = uvloop.run(replay(policy, plan, args, model))
        results.append(res)
        print(f"{policy:<18} mean {res['mean_e2e']:6.2f} s  p99 {res['p99_e2e']:6.2f} s  "
              f"errors {res['errors']}", flush=True)  # fmt: skip
    live = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "engines": args.engines, "time_scale": args.time_scale, "requests": len(plan),
        "rate": rate, "load": args.load, "results": results,
    }  # fmt: skip
    docs = ROOT / "docs"
    path = docs / "routing_live.json"
    # One entry per (engines, time scale): a rerun replaces its own, others are kept.
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs = [r for r in runs if (r["engines"], r["time_scale"]) != (args.engines, args.time_scale)]
    path.write_text(json.dumps({"runs": [*runs, live]}, indent=1))
    sim = docs / "routing_sim.json"
    if sim.exists():
        write_report(json.loads(sim.read_text()), docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
