"""Fairness live: locust through `fairway serve` on simulated engines, one run per policy.

Starts the gateway as a user does (`fairway serve` on a generated config: the shipped tenants,
keys and applications, two simulated A100 engines with 8 requests in flight each), runs the
locust users of loadtest/locustfile.py headless against it, and reports VTC's metrics and
per-tenant TTFT from the requests locust recorded. The section between the `live` markers of
docs/FAIRNESS.md is replaced with the tables.

    .venv/bin/python benchmarks/fairness_live.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from _common import (  # noqa: E402
    engine_table,
    free_port,
    machine,
    splice_section,
    toml_table,
    wait_ready,
)

from loadtest.report import load, tables  # noqa: E402

BIN = Path(sys.executable).parent
READING = (
    "Reading it: the policies are judged here by the well-behaved tenants' TTFT (acme, "
    "globex): under FCFS they queue behind the abuser; VTC and WSC put them first. The short "
    "runs give few requests per 10 s window, so the service difference moves a lot between "
    "runs; under `wsc+oit` it also counts the abuser's refused requests as unmet demand, which "
    "OIT refuses on purpose. p99s on this shared 2-core machine include CPU stalls of the "
    "client, the gateway and the engines alike."
)
WEIGHTS = {"acme": 2.0, "globex": 1.0, "initech": 1.0}
SHARE = 100_000  # tokens a minute per unit of weight: the engines serve about four of these
# (label, fairness policy, token buckets on, locust user classes)
WELL = ("AcmeChat=6", "AcmeAgent=3", "GlobexChat=3")
ABUSE = (*WELL, "Abuser=10")
CALM = (*WELL, "InitechBatch=3")
RUNS = (
    ("fcfs, abuser", "fcfs", False, ABUSE),
    ("vtc, abuser", "vtc", False, ABUSE),
    ("wsc+oit, abuser", "wsc", True, ABUSE),
    ("wsc+oit, no abuser", "wsc", True, CALM),
)


def write_config(path: Path, port: int, policy: str, buckets: bool) -> None:
    """The gateway on `port` with the shipped tenants and keys and two simulated A100 engines,
    fairness `policy`, token buckets when `buckets`."""
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    sections = [
        toml_table("server", {"port": port, "host": "127.0.0.1"}),
        toml_table("logging", {"level": "warning"}),
        toml_table("sim", {"time_scale": 1.0, "seed": 7}),
        toml_table("fairness", {"policy": policy, "overload_at": 0.6, "queue_timeout_s": 120.0}),
    ]
    for name, t in shipped["tenants"].items():
        fields: dict[str, Any] = {"weight": t["weight"]}
        if buckets:  # about a weighted share of what the two engines serve, in tokens a minute
            fields["tokens_per_minute"] = round(SHARE * t["weight"])
            fields["burst_tokens"] = 30000
        for app, a in t["apps"].items():
            # Declared shapes as the load test sends them: trace prompts (doubled for batch),
            # outputs capped at 64 tokens.
            fields[f"apps.{app}"] = {
                "expected_prompt_tokens": 2310 if app == "batch" else 1155,
                "expected_output_tokens": 45,
                "calls_per_interaction": a.get("calls_per_interaction", 1),
            }
        fields["keys"] = t["keys"]
        sections.append(toml_table(f"tenants.{name}", fields))
    engine = engine_table("us-east", "llama-3.1-8b", kind="sim", gpu="A100", max_running=4)
    sections += [engine, engine]
    path.write_text("\n\n".join(sections) + "\n")


def run(label: str, policy: str, buckets: bool, users: tuple[str, ...], seconds: int,
        work: Path) -> Path:  # fmt: skip
    port = free_port()
    cfg = work / f"{policy}-{len(users)}-{buckets}.toml"
    write_config(cfg, port, policy, buckets)
    records = work / (re.sub(r"[^a-z0-9]+", "-", label) + ".jsonl")
    url = f"http://127.0.0.1:{port}"
    gw = subprocess.Popen([str(BIN / "fairway"), "serve", "--config", str(cfg)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_ready(f"{url}/healthz", gw, within=30.0)
        env = {**os.environ, "FAIRWAY_RECORDS": str(records), "FAIRWAY_MAX_OUTPUT": "64",
               "FAIRWAY_CYCLE_S": "3", "FAIRWAY_USERS": ",".join(users)}  # fmt: skip
        count = sum(int(u.split("=")[1]) for u in users)
        classes = [u.split("=")[0] for u in users]
        # locust exits 1 when any request failed: the refusals are expected here.
        subprocess.run(
            [str(BIN / "locust"), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
             "-u", str(count), "-r", str(count), "-t", f"{seconds}s", "-H", url,
             "--only-summary", *classes],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        gw.terminate()
        gw.wait(10)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "FAIRNESS.md")
    args = ap.parse_args()
    body: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, policy, buckets, users in RUNS:
            t0 = time.perf_counter()
            path = run(label, policy, buckets, users, args.seconds, Path(tmp))
            lines = tables(load(path, WEIGHTS), window_s=10.0, label=label)
            print(f"{label}: {time.perf_counter() - t0:.0f} s")
            print("\n".join(lines) + "\n")
            body += [*lines, ""]
    section = (
        "<!-- live -->\n## Live run through the gateway\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, with "
        "`.venv/bin/python benchmarks/fairness_live.py`: `fairway serve` with the shipped "
        "tenants (acme weight 2 with a chat and an agent application, globex and initech "
        "weight 1) in front of two simulated A100 engines (4 requests in flight each, time "
        f"scale 1), and locust for {args.seconds} s per run: acme's chat and agent users, "
        "globex's chat users (6, 3 and 3 users) and, as `Abuser`, ten initech users sending "
        "back to back (three `InitechBatch` users, one share, in the no-abuser run); users "
        "wait out `Retry-After` after a 429, as the openai SDK does. Lengths from the Azure "
        "trace, outputs capped at 64 tokens; the applications declare those shapes. The "
        "`wsc+oit` runs give each tenant a token bucket of 100,000 tokens a minute per unit of "
        "weight, `overload_at = 0.6`; the others "
        "run without buckets. Service windows of 10 s. The client, the gateway "
        "and the engines share this machine's two cores, so absolute times include that.\n\n"
        + READING
        + "\n\n"
        + "\n".join(body)
        + "<!-- /live -->"
    )
    text = args.out.read_text() if args.out.exists() else ""
    args.out.write_text(splice_section(text, "live", section))


if __name__ == "__main__":
    main()
