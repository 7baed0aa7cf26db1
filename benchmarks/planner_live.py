"""Planner live: `fairway serve` with the planner and the `sim` actuator under a day of locust
traffic compressed into minutes (loadtest/planner_day.py); engines should follow demand and no
request should fail while they come and go.

    make bench-planner-live   # or: .venv/bin/python benchmarks/planner_live.py [--day-seconds 480]

The gateway runs as `fairway serve` on a generated config (acme's chat key and the admin key of
config.planner.toml, one simulated H100 engine of llama-3.1-8b in us-east, `[planner]` on with
the `sim` actuator and `clock_speed` set so that the gateway's demand minutes and the planner's
clock run through the same day as the load: 180 times the wall clock for a 480 s day). Every
`--sample-s` seconds it reads GET /admin/engines, /admin/planner and the request counter of
/metrics; at the end it prints a table and writes docs/PLANNER_LIVE.md, docs/planner_live.png
and docs/planner_live.json (the samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks._common import (  # noqa: E402
    engine_table,
    free_port,
    machine,
    pyplot,
    save_figure,
    toml_table,
    wait_ready,
)
from loadtest.day import Day  # noqa: E402

BIN = Path(sys.executable).parent
ADMIN = "sk-fairway-admin"
KEY = ("llama-3.1-8b", "us-east", "H100")
MEAN_PROMPT = 1155  # mean prompt tokens of the Azure conversation trace the users draw from
# Prompts cut to this, so that every chat fits the simulated engine's 8,192-token context (a
# few of the trace's are longer, and would get a 400 that says so).
MAX_PROMPT = 8000


@dataclass(frozen=True, slots=True)
class Params:
    """One run. Times are wall-clock seconds unless they say otherwise."""

    day_s: float = 480.0
    peak_users: int = 48
    cycle_s: float = 0.5  # a user's request every cycle: requests/s = users / cycle
    max_output: int = 32
    clock_speed: float = 0.0  # the gateway's clock over the wall clock; 0: 86400 / day_s
    peak_engines: float = 6.0  # engines the peak's mean demand fills (sets tokens_per_s)
    interval_s: float = 2.0  # the planner re-plans this often
    startup_s: float = 1.5  # a simulated engine joins this long after it is asked for
    lifetime_s: float = 10.0  # no drain of an engine younger than this
    history_minutes: int = 120  # gateway minutes the forecast sees
    slot_minutes: int = 5
    slots: int = 12
    quota: int = 16
    sample_s: float = 2.0
    time_scale: float = 1.0  # the simulated engines' speed

    @property
    def speed(self) -> float:
        return self.clock_speed or 86400 / self.day_s


@dataclass(slots=True)
class Sample:
    t: float  # seconds since locust started
    users: int  # what the shape asks for now
    engines: int  # active (not draining) in the fleet
    draining: int
    wanted: int  # what the planner's last run wanted
    rps: float  # requests answered per second since the last sample
    in_flight: int


@dataclass(slots=True)
class Result:
    params: Params
    samples: list[Sample] = field(default_factory=list)
    requests: int = 0  # chats sent (POST requests)
    failures: int = 0
    ttft_ms: tuple[float, float] = (0.0, 0.0)  # locust's p50 and p99 of time to first token
    errors: list[str] = field(default_factory=list)  # locust's failures: "N x METHOD NAME: ERROR"
    in_flight_after: int = -1  # summed over engines and tenants once locust has finished
    planner_runs: int = 0
    planner_status: str = ""
    wall_s: float = 0.0


def write_config(path: Path, port: int, p: Params) -> None:
    example = tomllib.loads((ROOT / "config.planner.toml").read_text())
    k = p.speed
    # Capacity in prompt tokens per second of the gateway's clock: the peak's real rate over
    # `peak_engines`, slowed by the clock's speed. Set low on purpose (the performance model
    # gives an H100 about 17,000), so that one machine's load makes the planner scale.
    tokens_per_s = p.peak_users / p.cycle_s * MEAN_PROMPT / p.peak_engines / k
    acme = example["tenants"]["acme"]
    planner = {
        "enabled": True, "clock_speed": k, "interval_s": p.interval_s,
        "slot_minutes": p.slot_minutes, "slots": p.slots, "history_minutes": p.history_minutes,
        "quantile": 0.9, "headroom": 0.1, "min_lifetime_s": p.lifetime_s * k,
        "drain_deadline_s": 30.0, "batch_deadline_min": float(p.slot_minutes),
        "retry_after_s": 10 * k,
    }  # fmt: skip
    model = {"tokens_per_s": round(tokens_per_s, 4), "startup_min": p.startup_s * k / 60,
             "max_num_seqs": 64}  # fmt: skip
    sections = [
        toml_table("server", {"port": port, "host": "127.0.0.1", "health_interval_s": 1.0}),
        toml_table("logging", {"level": "info"}),
        toml_table("sim", {"time_scale": p.time_scale, "seed": 7}),
        toml_table("admin", {"keys": example["admin"]["keys"]}),
        toml_table(
            "tenants.acme",
            {"weight": acme["weight"], "apps.chat": acme["apps"]["chat"], "keys": acme["keys"]},
        ),
        engine_table("us-east", KEY[0], kind="sim", gpu="H100", max_num_seqs=64),
        toml_table("planner", planner),
        toml_table("planner.gpus.H100", {"cost_per_hour": 4.0}),
        toml_table(f'planner.models."{KEY[0]}".H100', model),
        toml_table("planner.quotas.us-east", {"H100": p.quota}),
        toml_table("planner.min_engines.us-east", {f'"{KEY[0]}"': 1}),
        toml_table("planner.actuator", {"kind": "sim", "startup_s": p.startup_s}),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def _get(url: str, admin: bool = True) -> Any:
    headers = {"Authorization": f"Bearer {ADMIN}"} if admin else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        body = r.read().decode()
    return json.loads(body) if admin else body


def _answered(url: str) -> float:
    text = _get(f"{url}/metrics", admin=False)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fairway_requests_total{"))  # fmt: skip


def in_flight(url: str) -> int:
    """What the gateway holds in flight: per engine (the ledger) and per tenant."""
    engines = _get(f"{url}/admin/engines")["engines"]
    tenants = _get(f"{url}/admin/tenants")
    return sum(e["in_flight"] for e in engines) + sum(
        t["requests_in_flight"] for t in tenants["tenants"].values()
    )


def _sample(url: str, t: float, day: Day, last: tuple[float, float]) -> tuple[Sample, float]:
    engines = _get(f"{url}/admin/engines")["engines"]
    plan = _get(f"{url}/admin/planner")
    answered, now = _answered(url), time.monotonic()
    rps = (answered - last[0]) / max(now - last[1], 1e-6)
    wanted = sum(w["engines"] for w in plan.get("wanted") or [])
    draining = sum(e["state"] == "draining" for e in engines)
    busy = sum(e["in_flight"] for e in engines)
    return Sample(t, day.users(t), len(engines) - draining, draining, wanted, rps, busy), answered


def run(p: Params, work: Path) -> Result:
    """The gateway and locust for one day; the gateway's log goes to `work`/gateway.log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = work / "planner-live.toml"
    write_config(cfg, port, p)
    day = Day(seconds=p.day_s, peak_users=p.peak_users)
    out = Result(p)
    log = (work / "gateway.log").open("wb")
    gw = subprocess.Popen([str(BIN / "fairway"), "serve", "--config", str(cfg)], stdout=log,
                          stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(f"{url}/healthz", gw, within=60.0)
        env = {**os.environ, "FAIRWAY_DAY_SECONDS": str(p.day_s),
               "FAIRWAY_PEAK_USERS": str(p.peak_users), "FAIRWAY_CYCLE_S": str(p.cycle_s),
               "FAIRWAY_MAX_OUTPUT": str(p.max_output),
               "FAIRWAY_MAX_PROMPT": str(MAX_PROMPT)}  # fmt: skip
        t0 = time.monotonic()
        locust = subprocess.Popen(
            [str(BIN / "locust"), "-f", str(ROOT / "loadtest" / "planner_day.py"), "--headless",
             "-H", url, "--stop-timeout", "30", "--csv", str(work / "locust"), "--only-summary"],
            env=env, stdout=subprocess.DEVNULL, stderr=(work / "locust.log").open("wb"),
        )  # fmt: skip
        last = (_answered(url), time.monotonic())
        while locust.poll() is None:
            time.sleep(max(0.0, p.sample_s - (time.monotonic() - last[1])))
            if locust.poll() is not None:
                break
            s, answered = _sample(url, time.monotonic() - t0, day, last)
            out.samples.append(s)
            last = (answered, time.monotonic())
        out.wall_s = time.monotonic() - t0
        out.samples = [s for s in out.samples if s.t < p.day_s]  # the day, not its stop
        deadline = time.monotonic() + 30
        while (held := in_flight(url)) and time.monotonic() < deadline:
            time.sleep(0.2)
        out.in_flight_after = held
        plan = _get(f"{url}/admin/planner")
        out.planner_runs, out.planner_status = plan["runs"], str(plan["status"])
        with (work / "locust_stats.csv").open() as f:
            rows = {r["Type"] or r["Name"]: r for r in csv.DictReader(f)}
        out.requests = int(rows["POST"]["Request Count"])
        out.failures = int(rows["Aggregated"]["Failure Count"])
        if "TTFT" in rows:
            out.ttft_ms = (float(rows["TTFT"]["50%"]), float(rows["TTFT"]["99%"]))
        with (work / "locust_failures.csv").open() as f:
            out.errors = [f"{r['Occurrences']} x {r['Method']} {r['Name']}: {r['Error']}"
                          for r in csv.DictReader(f)]  # fmt: skip
    finally:
        gw.terminate()
        gw.wait(15)
        log.close()
    return out


def summary(r: Result) -> dict[str, Any]:
    s = r.samples
    engines = [x.engines for x in s]
    peak_t = max(s, key=lambda x: x.users).t

    def corr(xs: list[float]) -> float:
        try:
            return statistics.correlation([float(e) for e in engines], xs)
        except statistics.StatisticsError:
            return float("nan")

    return {
        "requests": r.requests, "failures": r.failures, "errors": r.errors,
        "ttft_p50_ms": r.ttft_ms[0], "ttft_p99_ms": r.ttft_ms[1],
        "in_flight_after": r.in_flight_after,
        "engines_min": min(engines), "engines_max": max(engines), "engines_start": engines[0],
        "engines_end": engines[-1],
        "engines_at_peak": max(x.engines for x in s if abs(x.t - peak_t) <= r.params.day_s / 8),
        "corr_rps": corr([x.rps for x in s]), "corr_users": corr([float(x.users) for x in s]),
        "planner_runs": r.planner_runs, "wall_s": r.wall_s,
    }  # fmt: skip


def hourly(r: Result, hours: int = 2) -> list[str]:
    """Engines against demand in blocks of `hours` of the day."""
    day = Day(seconds=r.params.day_s)
    rows = ["| hours | users | requests/s | engines (mean) | engines (min-max) | wanted |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for h in range(0, 24, hours):
        xs = [x for x in r.samples if h <= day.hour(x.t) < h + hours]
        if not xs:
            continue
        e = [x.engines for x in xs]
        rows.append(
            f"| {h:02d}-{h + hours:02d} | {statistics.mean(x.users for x in xs):.1f} | "
            f"{statistics.mean(x.rps for x in xs):.1f} | {statistics.mean(e):.1f} | "
            f"{min(e)}-{max(e)} | {statistics.mean(x.wanted for x in xs):.1f} |"
        )
    return rows


def plot(r: Result, path: Path) -> None:
    plt = pyplot()
    day = Day(seconds=r.params.day_s)
    fig, ax = plt.subplots(figsize=(9, 4))
    hours = [day.hour(x.t) for x in r.samples]
    ax.plot(hours, [x.rps for x in r.samples], color="tab:blue", alpha=0.6, label="requests/s")
    ax.set_xlabel("hour of the compressed day")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.step(hours, [x.engines for x in r.samples], where="post", color="tab:red",
             label="engines (active)")  # fmt: skip
    ax2.step(hours, [x.wanted for x in r.samples], where="post", color="tab:orange",
             linestyle="--", label="engines the plan wants")  # fmt: skip
    ax2.set_ylabel("engines")
    ax2.set_ylim(bottom=0)
    fig.legend(loc="upper left", bbox_to_anchor=(0.08, 0.92))
    ax.set_title(f"fairway serve + planner (sim actuator): a day in {r.params.day_s:.0f} s")
    save_figure(fig, path)


def report(r: Result, command: str) -> str:
    p, m = r.params, summary(r)
    return "\n".join([
        "# Planner live: a day of locust traffic through `fairway serve`", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; the gateway (with its simulated "
        "engines in-process), locust and this script share the machine's 2 cores.", "",
        f"Command: `{command}`", "",
        f"A day runs in {p.day_s:.0f} s of wall time (loadtest/planner_day.py: planner/"
        f"workload.py's diurnal curve, trough 0.2 of the peak, peak at 14:00), {p.peak_users} "
        f"locust users at the peak, each sending a streaming chat (Azure trace prompts cut to "
        f"{MAX_PROMPT:,} tokens, at most {p.max_output} output tokens) every {p.cycle_s:g} s. "
        "The gateway's clock runs "
        f"{p.speed:.0f} times faster than the wall clock, so its demand minutes are the day's "
        f"minutes. The planner re-plans every {p.interval_s:g} s (wall), {p.slots} slots of "
        f"{p.slot_minutes} min, {p.history_minutes} min of history; a new engine joins "
        f"{p.startup_s:g} s (wall) after it is asked for and is not drained for "
        f"{p.lifetime_s:g} s. Engine capacity is set so that the peak's mean demand fills about "
        f"{p.peak_engines:g} engines (far below what the performance model gives an H100, so "
        "that one machine's load makes the planner scale).", "",
        "| chats | failed | TTFT p50 / p99 (ms) | in flight after | engines min / start / peak "
        "/ end / max | corr(engines, requests/s) | corr(engines, users) | planner runs |",
        "|---|---|---|---|---|---|---|---|",
        f"| {m['requests']} | {m['failures']} | {m['ttft_p50_ms']:.0f} / {m['ttft_p99_ms']:.0f} | "
        f"{m['in_flight_after']} | {m['engines_min']} / {m['engines_start']} / "
        f"{m['engines_at_peak']} / {m['engines_end']} / {m['engines_max']} | "
        f"{m['corr_rps']:.2f} | {m['corr_users']:.2f} | {m['planner_runs']} |", "",
        "`failed` counts every locust failure (a status other than 200 or a broken stream); "
        "`in flight after` is what the gateway still counts as busy, per engine and per tenant, "
        "once locust has finished. Peak engines are the most active within three hours of the "
        "busiest moment, end engines the last sample's. Correlations are Pearson's over the "
        f"samples taken every {p.sample_s:g} s (requests/s is measured from the gateway's "
        "request counter over each interval; users is what the shape asked for).", "",
        *hourly(r), "", "![engines against demand](planner_live.png)", "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    d = Params()
    for name in ("day_s", "peak_users", "cycle_s", "clock_speed", "peak_engines", "interval_s",
                 "startup_s", "lifetime_s", "sample_s"):  # fmt: skip
        flag = "--day-seconds" if name == "day_s" else "--" + name.replace("_", "-")
        ap.add_argument(flag, dest=name, type=type(getattr(d, name)), default=getattr(d, name))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "PLANNER_LIVE.md")
    ap.add_argument("--keep", type=Path, help="keep the config and the logs in this folder")
    ns = vars(ap.parse_args(args))
    out_path, keep = ns.pop("out"), ns.pop("keep")
    p = replace(d, **ns)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        r = run(p, keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(p, Path(tmp))
    m = summary(r)
    print("\n".join(hourly(r)))
    print(json.dumps(m, indent=1))
    command = (
        "make bench-planner-live"
        if not args
        else ".venv/bin/python benchmarks/planner_live.py " + " ".join(args)
    )
    plot(r, out_path.with_name("planner_live.png"))
    out_path.write_text(report(r, command.strip()))
    record = {"machine": machine(), "params": asdict(p), "summary": m,
              "samples": [asdict(x) for x in r.samples]}  # fmt: skip
    out_path.with_name("planner_live.json").write_text(json.dumps(record, indent=1) + "\n")
    ok = m["failures"] == 0 and m["in_flight_after"] == 0 and m["corr_users"] > 0.7
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
