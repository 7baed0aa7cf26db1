"""Live routing run: the real gateway on simulated engines, a trace slice replayed through it, and
the same slice through the gateway's gate core in the cluster simulator, side by side.

The gateway is built with `gateway.http.app.build_app` on the config the simulator runs
(benchmarks/routing_sim.py: the workload's tenants, applications and keys, simulated H100
engines) and run in this process (uvloop), with the length model that routing_bench.py trains
(trained here if missing). An async aiohttp client replays the evaluation slice of the Azure
trace (synthetic tenants and bodies, benchmarks/routing_workload.py) at a share of the fleet's
capacity measured in the simulator, open loop: each request leaves at its trace time whatever
the others do. Bodies carry `sim_output_tokens` so that the engines generate the trace's length
while `max_tokens` keeps the client's meaning. One request in `--stream-every` is streamed, for
TTFT and TPOT as the client sees them; the others are not: relaying every token of thousands of
streams would make this machine's CPU, not the engines, the bottleneck.

Each policy's slice then runs through `gateway.simulate.GateFrontend` on the same config, with
the gauges scraped as often in modelled time as the live gateway scrapes them
(`health_interval_s` over the time scale), so the two differ only in what is simulated: the
clock, the engines' steps and the HTTP path. The client also samples its event loop's lateness,
which the engines' steps, the gateway and the client share.

Writes docs/routing_live.json and refreshes docs/ROUTING.md when docs/routing_sim.json exists.

    make bench-routing-live    # or: .venv/bin/python benchmarks/routing_live.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine, quantile  # noqa: E402
from benchmarks.routing_bench import (  # noqa: E402
    TRAIN_SHARE,
    WORK,
    capacity,
    eval_jobs,
    write_log,
)
from benchmarks.routing_report import write_report  # noqa: E402
from benchmarks.routing_sim import (  # noqa: E402
    config_dict,
    fleet,
    frontend,
    key,
    make_job,
    simulate,
    specs_of,
    summarise,
)
from benchmarks.routing_workload import load_trace, requests  # noqa: E402
from gateway.config.schema import parse  # noqa: E402
from gateway.http.app import build_app  # noqa: E402
from gateway.lengths.train import train_and_report  # noqa: E402
from gateway.obs.logs import configure  # noqa: E402

LAG_TICK_S = 0.005  # the event loop's lateness is sampled this often
# The simulator's spread on the slice: predicted-latency and round robin again with every
# arrival delayed by a random 0 to 10 ms, the order of how late the live client's requests
# leave (a few ms on average).
JITTER_S = 0.010
JITTER_POLICIES = ("predicted-latency", "round-robin")


@dataclass(frozen=True, slots=True)
class Planned:
    t: float  # modelled seconds from the slice's start
    tenant: str
    app: str
    body: dict[str, Any]  # as sent, `sim_output_tokens` included
    output_tokens: int
    stream: bool


def live_config(policy: str, engines: int, time_scale: float, model: Path) -> dict[str, Any]:
    doc = config_dict(fleet(engines), policy, model)
    doc["server"] = {"read_timeout_s": 600.0}
    doc["sim"] = {"time_scale": time_scale, "seed": 1}
    doc["logging"] = {"level": "warning"}
    return doc


def _stats(e2e: list[float], ttft: list[float], tpot: list[float]) -> dict[str, float]:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "mean_e2e": mean(e2e), "p99_e2e": quantile(e2e, 0.99),
        "mean_ttft": mean(ttft), "p99_ttft": quantile(ttft, 0.99),
        "mean_tpot": mean(tpot), "p99_tpot": quantile(tpot, 0.99),
    }  # fmt: skip


async def replay(policy: str, plan: list[Planned], args: argparse.Namespace,
                 model: Path) -> dict[str, Any]:  # fmt: skip
    raw = live_config(policy, args.engines, args.time_scale, model)
    runner = web.AppRunner(build_app(parse(raw), raw=raw), handler_cancellation=True,
                           access_log=None, auto_decompress=False)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
    scale = args.time_scale
    e2e: list[float] = []
    ttft: list[float] = []
    tpot: list[float] = []
    send_lag: list[float] = []
    loop_lag: list[float] = []
    errors = 0
    done = False

    async def ticker() -> None:
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            loop_lag.append(time.perf_counter() - t - LAG_TICK_S)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter()
        tick = asyncio.get_running_loop().create_task(ticker())

        async def one(p: Planned) -> None:
            nonlocal errors
            due = start + p.t * scale
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            sent = time.perf_counter()
            send_lag.append(sent - due)
            headers = {"Authorization": f"Bearer {key(p.tenant, p.app)}"}
            first: float | None = None
            async with http.post(url, json=p.body, headers=headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    errors += 1
                    return
                if p.stream:
                    async for chunk in resp.content.iter_any():
                        if first is None and chunk:
                            first = time.perf_counter()
                else:
                    await resp.read()
            end = time.perf_counter()
            e2e.append((end - sent) / scale)
            if first is not None:
                ttft.append((first - sent) / scale)
                if p.output_tokens > 1:
                    tpot.append((end - first) / scale / (p.output_tokens - 1))

        await asyncio.gather(*(one(p) for p in plan))
        done = True
        await tick
    await runner.cleanup()
    return {
        **_stats(e2e, ttft, tpot),
        "n": len(e2e),
        "streamed": len(ttft),
        "errors": errors,
        # Wall-clock seconds: how late requests left, how late the event loop woke.
        "mean_send_lag_s": sum(send_lag) / len(send_lag),
        "p99_send_lag_s": quantile(send_lag, 0.99),
        "mean_loop_lag_s": sum(loop_lag) / len(loop_lag),
        "p99_loop_lag_s": quantile(loop_lag, 0.99),
    }


def simulated(policy: str, plan: list[Planned], args: argparse.Namespace, model: Path,
              delay: float = 0.0, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The slice through the gate core in the cluster simulator, on the live run's config;
    each arrival delayed by a random 0 to `delay` modelled seconds when `delay` is given."""
    cfg = parse(live_config(policy, args.engines, args.time_scale, model))
    rng = random.Random(seed)
    jobs = [make_job(str(i), p.t + rng.uniform(0.0, delay), p.tenant, p.app, p.body,
                     p.output_tokens)
            for i, p in enumerate(plan)]  # fmt: skip
    jobs.sort(key=lambda j: j.arrival)
    front = frontend(cfg, scrape_interval=cfg.server.health_interval_s / args.time_scale)
    done = simulate(specs_of(cfg), front, jobs)
    streamed = [j for j in done if plan[int(j.id)].stream]
    e2e = [j.latency for j in done if j.latency is not None]
    ttft = [j.ttft for j in streamed if j.ttft is not None]
    tpot = [t for j in streamed if (t := j.tpot) is not None]
    return {
        **_stats(e2e, ttft, tpot),
        "n": len(e2e),
        "streamed": len(ttft),
        "errors": sum(j.rejected is not None for j in done),
        "all": asdict(summarise(done)),  # TTFT and TPOT over every request, not the sample
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--load", type=float, default=0.7, help="share of simulated capacity")
    ap.add_argument("--seconds", type=float, default=60.0, help="modelled seconds of arrivals")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--stream-every", type=int, default=10,
                    help="stream one request in this many (TTFT, TPOT)")  # fmt: skip
    ap.add_argument("--policies", default="predicted-latency,round-robin,least-outstanding")
    ap.add_argument("--jitter-runs", type=int, default=5,
                    help="simulator runs with jittered arrivals, for its spread")  # fmt: skip
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
    plan: list[Planned] = []
    for i, r in enumerate(requests(rows[cut:], cut)):
        t = (r.t - rows[cut].t) * k
        if t > args.seconds:
            break
        stream = args.stream_every > 0 and i % args.stream_every == 0
        body = {**r.body, "sim_output_tokens": r.output_tokens}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        plan.append(Planned(t, r.tenant, r.app, body, r.output_tokens, stream))
    plan.sort(key=lambda p: p.t)
    print(f"{len(plan)} requests at {rate:.1f}/s ({args.load:.0%} of {cap:.1f}) on "
          f"{args.engines} engines, time scale {args.time_scale}, "
          f"{sum(p.stream for p in plan)} streamed", flush=True)  # fmt: skip
    interval = parse(live_config("round-robin", args.engines, 1.0, model)).server.health_interval_s
    results = []
    for policy in args.policies.split(","):
        t0 = time.perf_counter()
        live = uvloop.run(replay(policy, plan, args, model))
        sim = simulated(policy, plan, args, model)
        results.append({"policy": policy, "live": live, "sim": sim,
                        "wall_s": time.perf_counter() - t0})  # fmt: skip
        for name, m in (("live", live), ("sim", sim)):
            print(f"{policy:<18} {name:<4} mean {m['mean_e2e']:6.2f} s  p99 {m['p99_e2e']:6.2f} s"
                  f"  ttft {m['mean_ttft'] * 1e3:6.0f} ms  tpot {m['mean_tpot'] * 1e3:5.1f} ms"
                  f"  errors {m['errors']}", flush=True)  # fmt: skip
        print(f"{'':<18} send lag {live['mean_send_lag_s'] * 1e3:.1f} ms mean, loop lag "
              f"{live['mean_loop_lag_s'] * 1e3:.1f} ms mean, "
              f"{live['p99_loop_lag_s'] * 1e3:.1f} ms p99", flush=True)  # fmt: skip
    jitter = []
    for seed in range(1, args.jitter_runs + 1):
        at = {p: simulated(p, plan, args, model, JITTER_S, seed) for p in JITTER_POLICIES}
        pl, rr = (at[p] for p in JITTER_POLICIES)
        jitter.append({k: pl[k] / rr[k] - 1 for k in ("mean_e2e", "mean_ttft", "mean_tpot")})
        print(f"jittered arrivals, seed {seed}: predicted-latency vs round-robin "
              f"{jitter[-1]['mean_e2e']:+.1%} mean e2e", flush=True)  # fmt: skip
    run = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "engines": args.engines, "time_scale": args.time_scale, "requests": len(plan),
        "rate": rate, "load": args.load, "capacity": cap, "seconds": args.seconds,
        "stream_every": args.stream_every, "health_interval_s": interval,
        "lag_tick_s": LAG_TICK_S, "jitter_s": JITTER_S, "jitter": jitter,
        "results": results,
    }  # fmt: skip
    docs = ROOT / "docs"
    path = docs / "routing_live.json"
    # One entry per (engines, time scale): a rerun replaces its own, others are kept.
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    runs = [x for x in runs if (x["engines"], x["time_scale"]) != (args.engines, args.time_scale)]
    runs = sorted([*runs, run], key=lambda x: (x["engines"], x["time_scale"]))
    path.write_text(json.dumps({"runs": runs}, indent=1))
    sim_doc = docs / "routing_sim.json"
    if sim_doc.exists():
        write_report(json.loads(sim_doc.read_text()), docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
