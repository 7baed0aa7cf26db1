"""Routing evaluation: every policy on the Azure conversation trace in the cluster simulator.

1. The first 60% of the trace (synthetic tenants and bodies, benchmarks/routing_workload.py)
   becomes a feature log, as the gateway writes it; `fairway train-router`'s code trains the
   length model on it (its last 20% held out) and reports MAE against the two baselines.
2. The fleet's capacity is measured by flooding it (every request at t=0, waiting in the
   gateway's queue) and counting completions per second between the 10th and 90th percentile
   of finish times.
3. 4,000 rows of the last 40% of the trace are replayed, time-scaled to 50%, 70% and 90% of that
   capacity, on 4 and 16 H100 engines serving Llama 3.1 8B, through each policy (on 16 engines,
   four copies of the slice are superposed, each shifted and with its own application draw, so
   both fleets see the same time compression). Each run goes through the gateway's gate core
   (benchmarks/routing_sim.py: admission, the fairness queue, the configured router, the
   length service; gauges scraped every `health_interval_s`) on the gateway's default config.
4. At 4 engines and 70%, predicted-latency and round robin run again with the gate core's
   in-flight limits lifted and the gauges read at every decision, one at a time.
5. The cost of one routing decision over 16 engines and of one length prediction is timed.

Prints the tables and writes docs/ROUTING.md (with docs/routing_latency.png) and
docs/routing_sim.json. The live run through the gateway (benchmarks/routing_live.py) adds its
own section when docs/routing_live.json exists.

    make bench-routing      # or: .venv/bin/python benchmarks/routing_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import timeit
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine  # noqa: E402
from benchmarks.routing_report import write_report  # noqa: E402
from benchmarks.routing_sim import (  # noqa: E402
    config,
    fleet,
    frontend,
    make_job,
    simulate,
    specs_of,
    summarise,
)
from benchmarks.routing_workload import Row, load_trace, requests  # noqa: E402
from engines.cluster import Job  # noqa: E402
from gateway.core.ledger import EngineSnapshot  # noqa: E402
from gateway.lengths.featurelog import FeatureLog  # noqa: E402
from gateway.lengths.features import Record, extract  # noqa: E402
from gateway.lengths.predictor import LengthPredictor  # noqa: E402
from gateway.lengths.service import LengthService  # noqa: E402
from gateway.lengths.train import train_and_report  # noqa: E402
from gateway.obs.logs import configure  # noqa: E402
from gateway.routing.latency import EngineProfile, build_policy  # noqa: E402
from gateway.routing.policies import POLICY_NAMES, RoutingPolicy  # noqa: E402

TRAIN_SHARE = 0.6
EVAL_ROWS = 4000  # of the held-out 40%: enough for stable means, short enough for 2 cores
WORK = ROOT / ".bench" / "routing"  # the feature log and the model, reused by routing_live.py
LOADS = (0.5, 0.7, 0.9)
FLEETS = (4, 16)


def write_log(rows: list[Row], directory: Path) -> None:
    """The feature log the gateway would have written for `rows`: its length service, without
    a model, annotating each request and logging it with the length it got."""
    service = LengthService(LengthPredictor(), FeatureLog(directory))
    for i, r in enumerate(requests(rows)):
        req = make_job(str(i), r.t, r.tenant, r.app, r.body, r.output_tokens).info
        info, rec = service.annotate(req.info, req.body)
        service.finish(info, rec, r.output_tokens)
    service.close()


def record(job: Job) -> Record:
    """The length predictor's features of a job's request (without the application's history)."""
    return extract(job.info.info, job.info.body)


def eval_jobs(rows: list[Row], start: int, copies: int) -> list[Job]:
    """Jobs for the evaluation slice, `copies` superposed (each shifted cyclically)."""
    t0 = rows[0].t
    span = rows[-1].t - t0
    jobs: list[Job] = []
    for c in range(copies):
        shift = span * c / copies
        for k, r in enumerate(requests(rows, start + c * 1_000_003)):
            t = (r.t - t0 + shift) % span
            jobs.append(make_job(f"{c}-{k}", t, r.tenant, r.app, r.body, r.output_tokens))
    jobs.sort(key=lambda j: j.arrival)
    return jobs


def capacity(n: int, jobs: list[Job]) -> float:
    """Requests per second the fleet completes when flooded."""
    flood = [Job(j.id, 0.0, j.model, j.prompt_tokens, j.output_tokens, j.info) for j in jobs]
    # The whole flood waits in the gateway's queue: no per-tenant bound on it here.
    cfg = config(fleet(n), "least-outstanding", fairness={"max_queue_per_tenant": len(jobs)})
    done = sorted(j.finished or 0.0 for j in simulate(specs_of(cfg), frontend(cfg), flood))
    k = len(done)
    return 0.8 * k / (done[int(0.9 * k)] - done[int(0.1 * k)])


def scaled(jobs: list[Job], cap: float, load: float) -> list[Job]:
    """`jobs` with their arrival times stretched so that they come at `load` of `cap`."""
    k = len(jobs) / (jobs[-1].arrival - jobs[0].arrival) / (load * cap)
    return [Job(j.id, j.arrival * k, j.model, j.prompt_tokens, j.output_tokens, j.info)
            for j in jobs]  # fmt: skip


def run_one(jobs: list[Job], n: int, policy: str, model: Path,
            engine: dict[str, Any] | None = None,
            scrape_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One policy on `n` engines through the gate core; `engine` adds engine settings to the
    config, `scrape_interval` replaces the gateway's health interval."""
    t = time.perf_counter()
    cfg = config(fleet(n), policy, model, engine=engine)
    done = simulate(specs_of(cfg), frontend(cfg, scrape_interval=scrape_interval), jobs)
    err = [abs((j.info.info.predicted_output_tokens or 0) - j.generated) for j in done]
    return {
        "engines": n, "policy": policy, **asdict(summarise(done)),
        "pred_mae": sum(err) / len(err),
        # Waited in the gateway's queue (every engine at its in-flight limits), refused.
        "queued": sum(j.started is not None and j.started > j.arrival for j in done),
        "rejected": sum(j.rejected is not None for j in done),
        "wall_s": time.perf_counter() - t,
    }  # fmt: skip


def _print(label: str, row: dict[str, Any]) -> None:
    print(
        f"{label} {row['policy']:<18} mean {row['mean_e2e']:6.2f} s  p99 {row['p99_e2e']:6.2f} s"
        f"  ttft {row['mean_ttft'] * 1000:6.0f} ms  tpot {row['mean_tpot'] * 1000:5.1f} ms"
        f"  queued {row['queued']}  ({row['wall_s']:.1f} s)",
        flush=True,
    )


def run_all(jobs: list[Job], n: int, cap: float, model: Path) -> list[dict[str, Any]]:
    out = []
    for load in LOADS:
        at = scaled(jobs, cap, load)
        for name in POLICY_NAMES:
            row = {"load": load, **run_one(at, n, name, model)}
            out.append(row)
            _print(f"{n:>3} engines {load:.0%}", row)
    return out


# The gate core's own parts undone one at a time, at the setting the live replay runs.
FRONTEND_SETTING = (4, 0.7)
FRONTEND_VARIANTS: tuple[tuple[str, dict[str, Any] | None, float | None], ...] = (
    # Every request goes straight to an engine, which queues it; gauges read at each decision.
    ("no in-flight limits, gauges fresh", {"max_running": 10**6, "max_kv_tokens": 0}, 0.0),
    ("in-flight limits, gauges fresh", None, 0.0),
    ("in-flight limits, gauges every 2 s", None, None),  # the gateway's defaults
)


def frontend_effect(jobs: list[Job], cap: float, model: Path) -> list[dict[str, Any]]:
    n, load = FRONTEND_SETTING
    at = scaled(jobs, cap, load)
    out = []
    for label, engine, scrape in FRONTEND_VARIANTS:
        for name in ("predicted-latency", "round-robin"):
            row = {"variant": label, "load": load, **run_one(at, n, name, model, engine, scrape)}
            out.append(row)
            _print(f"{label:<36}", row)
    return out


def decision_cost(n: int = 16) -> dict[str, float]:
    """Microseconds per choose() over `n` engines with mixed load, per policy."""
    rng = random.Random(1)
    snaps = [
        EngineSnapshot(
            id=f"e{i}", region="r0", model="m", running=rng.randint(0, 200),
            waiting=rng.randint(0, 5), kv_usage=rng.random(), in_flight=rng.randint(0, 200),
            in_flight_prompt_tokens=rng.randint(0, 200_000),
            in_flight_decode_tokens=rng.randint(0, 60_000),
            recent_prompt_rate=rng.uniform(0, 30_000), recent_prompt_at=-rng.random(),
        )
        for i in range(n)
    ]  # fmt: skip
    body = {"model": "m", "messages": [{"role": "user", "content": "hello " * 300}],
            "max_tokens": 512}  # fmt: skip
    probe = make_job("x", 0.0, "acme", "chat", body, 100).info.info
    info = replace(probe, predicted_output_tokens=180, predicted_output_upper=600)
    profiles = {s.id: EngineProfile.named() for s in snaps}
    out = {}
    for name in POLICY_NAMES:
        policy = build_policy(name, profiles)
        reps = 20000

        def once(p: RoutingPolicy = policy) -> None:
            p.choose(info, snaps)

        best = min(timeit.repeat(once, number=reps, repeat=5))
        out[name] = best / reps * 1e6
    return out


def predictor_cost(model: Path, rows: list[Row], start: int) -> dict[str, float]:
    recs = [record(make_job(str(i), r.t, r.tenant, r.app, r.body, r.output_tokens))
            for i, r in enumerate(requests(rows[:500], start))]  # fmt: skip
    out = {}
    for label, pred in (("LightGBM model", LengthPredictor(model)),
                        ("fallback (running quantiles)", LengthPredictor())):  # fmt: skip

        def once(p: LengthPredictor = pred) -> None:
            for r in recs:
                p.predict(p.with_history(r))

        out[label] = min(timeit.repeat(once, number=1, repeat=3)) / len(recs) * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2,000-request slice, for a smoke run")
    ap.add_argument("--out", default=str(ROOT / "docs"))
    args = ap.parse_args()
    configure("warning")
    rows = load_trace()
    cut = int(len(rows) * TRAIN_SHARE)
    train_rows, eval_rows = rows[:cut], rows[cut : cut + EVAL_ROWS]
    if args.quick:
        train_rows, eval_rows = train_rows[-4000:], eval_rows[:2000]
    work = Path(tempfile.mkdtemp(prefix="fairway-routing-")) if args.quick else WORK
    shutil.rmtree(work / "logs", ignore_errors=True)
    write_log(train_rows, work / "logs")
    model = work / "length-model.json"
    t = time.perf_counter()
    report = train_and_report([work / "logs"], model, rounds=200, show_progress=False)
    train_s = time.perf_counter() - t
    for name, s in report.items():
        print(f"{name:<22} MAE {s.mae:6.1f}  bucket {s.bucket_accuracy:.1%}  "
              f"p90 coverage {s.coverage:.1%}")  # fmt: skip
    results: list[dict[str, Any]] = []
    frontend_rows: list[dict[str, Any]] = []
    caps = {}
    for n in FLEETS:
        jobs = eval_jobs(eval_rows, cut, n // 4)
        caps[n] = capacity(n, jobs)
        print(f"{n} engines: capacity {caps[n]:.1f} req/s on this workload", flush=True)
        results += run_all(jobs, n, caps[n], model)
        if n == FRONTEND_SETTING[0]:
            frontend_rows = frontend_effect(jobs, caps[n], model)
    doc = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_s": train_s,
        "predictor": {k: asdict(v) for k, v in report.items()},
        "capacity": caps,
        "results": results,
        "frontend": frontend_rows,
        "decision_us": decision_cost(),
        "predict_us": predictor_cost(model, eval_rows, cut),
    }
    out = Path(args.out)
    (out / "routing_sim.json").write_text(json.dumps(doc, indent=1))
    write_report(doc, out)
    print(f"wrote {out / 'ROUTING.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
