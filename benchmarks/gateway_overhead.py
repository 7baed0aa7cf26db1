"""What the gateway adds: Fairway (and other proxies) versus straight to the same engines.

Starts two simulated engines (`fairway sim`, separate processes), Fairway in front of them,
and, where installed, LiteLLM's proxy and vllm-router in front of the same engines. A closed
loop of C streaming clients (benchmarks/loadgen.py, its own process) runs against each target
in turn, side by side in one run, in two phases:

- paced: engines at the modelled H100 speed, 64 output tokens per request: the latency a
  client sees added by the proxy while tokens arrive at a real engine's pace;
- saturated: engines 1000x faster than the model, 16 output tokens: the proxy is the
  bottleneck, so requests per second is the highest rate it sustains.

Prints the tables and writes docs/BENCHMARKS.md with the machine it ran on.

    make bench      # or: .venv/bin/python benchmarks/gateway_overhead.py [--quick]
    # with the others: --litellm /path/to/venv/bin/litellm --vllm-router /path/to/vllm-router
    # where Fairway's CPU goes: --py-spy DIR (py-spy installed; one extra, unmeasured cell)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import engine_table, free_port, machine, toml_table, wait_ready
from gateway_overhead_report import render, write_report

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MODEL = "llama-3.1-8b"
KEY = "sk-acme-chat"
KEY_DIGEST = "d5002616d4be831a64167d670584a8981c06a506b161513ca2dac9175df627d7"


@dataclass
class Phase:
    name: str
    time_scale: float
    max_tokens: int
    jitter_ms: float  # random pause before each request, to spread arrivals over engine steps
    what: str


PHASES = [
    Phase("paced", 1.0, 64, 20.0, "engines at modelled H100 speed, 64 output tokens"),
    Phase("saturated", 0.001, 16, 0.0, "engines 1000x faster than modelled, 16 output tokens"),
]
TITLES = {p.name: p.what for p in PHASES}  # the report's section of each phase
METRICS = ("rps", "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "cpu_ms",
           "events_per_request")  # fmt: skip


@contextlib.contextmanager
def process(
    args: list[str], ready: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_ready(ready, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fairway_config(engines: list[str], path: Path, tune_gc: bool = True) -> None:
    """Fairway with one tenant, acme, holding the benchmark's key, and `engines` behind it.
    Its concurrency cap is off, as the other proxies have none: 512 streams are twice the
    default `max_concurrent`. `tune_gc` False: Python's garbage-collector defaults."""
    acme = {"apps.chat": {}, "keys": [{"sha256": KEY_DIGEST, "app": "chat"}], "max_concurrent": 0}
    tables = [
        toml_table("logging", {"level": "warning"}),
        *([] if tune_gc else [toml_table("server", {"tune_gc": False})]),
        toml_table("tenants.acme", acme),
        *(engine_table("local", MODEL, kind="vllm", url=url) for url in engines),
    ]
    path.write_text("\n".join(tables) + "\n")


def litellm_config(engines: list[str], path: Path) -> None:
    """LiteLLM's proxy at its leanest: no database, no callbacks, no spend or message logs,
    and nothing fetched from the internet (a tokenizer download would stall it)."""
    entries = "".join(
        f"  - model_name: {MODEL}\n"
        f"    litellm_params: {{model: hosted_vllm/{MODEL}, api_base: {url}/v1, api_key: none}}\n"
        for url in engines
    )
    path.write_text(
        "model_list:\n" + entries + "router_settings:\n  routing_strategy: simple-shuffle\n"
        "litellm_settings:\n  drop_params: true\n  disable_hf_tokenizer_download: true\n"
        "  set_verbose: false\n  turn_off_message_logging: true\n"
        "  disable_end_user_cost_tracking: true\n  request_timeout: 600\n  num_retries: 0\n"
        "  callbacks: []\n  success_callback: []\n  failure_callback: []\n"
        "general_settings:\n  master_key: " + KEY + "\n  disable_spend_logs: true\n"
        "  disable_error_logs: true\n  disable_reset_budget: true\n"
    )


# A starter runs a proxy in front of the engines and yields (its URL, its process id).
Starter = Callable[[list[str], Path], contextlib.AbstractContextManager[tuple[str, int]]]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and its threads (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fairway_starter(tune_gc: bool = True) -> Starter:
    @contextlib.contextmanager
    def start(engines: list[str], work: Path) -> Iterator[tuple[str, int]]:
        name = "fairway" if tune_gc else "fairway-gc-off"
        cfg = work / f"{name}.toml"
        fairway_config(engines, cfg, tune_gc)
        port = free_port()
        cmd = [PY, "-m", "gateway.cli", "serve", "--config", str(cfg), "--port", str(port)]
        url = f"http://127.0.0.1:{port}"
        with process(cmd, f"{url}/healthz", work / f"{name}.log") as proc:
            yield url, proc.pid

    return start


start_fairway = fairway_starter()


def litellm_starter(binary: str) -> Starter:
    @contextlib.contextmanager
    def start(engines: list[str], work: Path) -> Iterator[tuple[str, int]]:
        cfg = work / "litellm.yaml"
        litellm_config(engines, cfg)
        port = free_port()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_LOCAL_BLOG_POSTS": "True", "NO_DOCS": "True",
               "DISABLE_ADMIN_UI": "True"}  # fmt: skip
        cmd = [binary, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
               "--num_workers", "1"]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with process(cmd, f"{url}/health/readiness", work / "litellm.log", env) as proc:
            yield url, proc.pid

    return start


def vllm_router_starter(binary: str) -> Starter:
    @contextlib.contextmanager
    def start(engines: list[str], work: Path) -> Iterator[tuple[str, int]]:
        port = free_port()
        cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin",
               "--prometheus-port", str(free_port()), "--worker-startup-check-interval", "1",
               "--log-level", "error", "--worker-urls", *engines]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with process(cmd, f"{url}/health", work / "vllm-router.log") as proc:
            yield url, proc.pid

    return start


def load(urls: list[str], concurrency: int, phase: Phase, seconds: float) -> dict[str, Any]:
    cmd = [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--key", KEY, "--model", MODEL,
           "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", "2",
           "--max-tokens", str(phase.max_tokens), "--jitter-ms", str(phase.jitter_ms)]  # fmt: skip
    for u in urls:
        cmd += ["--url", u]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 300)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    # No request completed in the window: percentiles are undefined (JSON null).
    return {k: float("nan") if v is None else v for k, v in result.items()}


def profile(pid: int, urls: list[str], c: int, phase: Phase, seconds: float, out: Path) -> None:
    """Sample the process `pid` with py-spy through one more cell (not counted: sampling takes
    CPU from the machine the cell shares) into `out` (collapsed stacks); print its top frames."""
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    rec = subprocess.Popen([spy, "record", "--nonblocking", "-r", "200", "-f", "raw", "-o",
                            str(out), "-p", str(pid), "-d", str(int(seconds) + 3)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    load(urls, c, phase, seconds)
    rec.wait()
    own: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frame = stack.rsplit(";", 1)[-1]
        name = frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame
        own[name] = own.get(name, 0) + int(n)
    total = sum(own.values()) or 1
    print(f"fairway {phase.name} c={c}: {out} ({total} samples); own time:")
    for name, n in sorted(own.items(), key=lambda x: -x[1])[:20]:
        print(f"  {100 * n / total:5.1f}% {name}")


def cell_line(phase: str, r: dict[str, Any]) -> str:
    return (
        f"{phase:9} c={r['concurrency']:<4} {r['target']:12} rps={r['rps']:8.1f} "
        f"ttft p50={r['ttft_p50_ms']:7.2f} ms p99={r['ttft_p99_ms']:7.2f} "
        f"e2e p50={r['e2e_p50_ms']:7.1f} ms cpu={r['cpu_ms']:.3f} ms/req "
        f"events/req={r['events_per_request']:.1f} errors={r['errors']} {r['error_kinds'] or ''}"
    )


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several rounds of a cell: the median of each figure, errors summed."""
    row = dict(runs[0])
    for key in METRICS:
        values = sorted(r[key] for r in runs)
        row[key] = values[len(values) // 2]
    row["errors"] = sum(r["errors"] for r in runs)
    kinds: dict[str, int] = {}
    for r in runs:
        for kind, n in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    row["error_kinds"] = kinds
    row["rounds"] = len(runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    p.add_argument("--clients", default="1,64,512")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians reported")
    p.add_argument("--litellm", default=shutil.which("litellm"), help="litellm CLI to compare")
    p.add_argument("--vllm-router", default=shutil.which("vllm-router"), help="vllm-router CLI")
    p.add_argument("--output", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--quick", action="store_true", help="2 s cells, no file written")
    p.add_argument("--from-json", default=None, help="re-render the report of an earlier run")
    p.add_argument(
        "--gc-off",
        action="store_true",
        help="also Fairway with [server] tune_gc = false (Python's GC defaults)",
    )
    p.add_argument("--py-spy", default=None, help="profile Fairway at the most clients into DIR")
    args = p.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write_report(data, TITLES, Path(args.output))
        return
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    clients = [int(c) for c in args.clients.split(",")]
    starters: dict[str, Starter] = {"fairway": start_fairway}
    if args.gc_off:
        starters["fairway-gc-off"] = fairway_starter(tune_gc=False)
    if args.litellm:
        starters["litellm"] = litellm_starter(args.litellm)
    if args.vllm_router:
        starters["vllm-router"] = vllm_router_starter(args.vllm_router)

    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fairway-bench-") as tmp:
        work = Path(tmp)
        for phase in PHASES:
            rows = results.setdefault(phase.name, [])
            with contextlib.ExitStack() as stack:
                engines = []
                for i in range(2):
                    port = free_port()
                    scale = str(phase.time_scale)
                    cmd = [PY, "-m", "gateway.cli", "sim", "--port", str(port), "--seed", str(i),
                           "--time-scale", scale, "--max-num-seqs", "1024"]  # fmt: skip
                    url = f"http://127.0.0.1:{port}"
                    stack.enter_context(process(cmd, f"{url}/health", work / f"engine{i}.log"))
                    engines.append(url)
                targets: dict[str, tuple[list[str], int | None]] = {"direct": (engines, None)}
                for name, starter in starters.items():
                    try:
                        url, pid = stack.enter_context(starter(engines, work))
                    except RuntimeError as exc:
                        print(f"{name}: not measured: {exc}", file=sys.stderr)
                        continue
                    targets[name] = ([url], pid)
                    load([url], 4, phase, 1.0)  # warm-up: first requests, connection pools
                cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
                for _ in range(rounds):  # rounds interleave the targets against drift
                    for c in clients:
                        for name, (urls, pid) in targets.items():
                            cpu0 = cpu_seconds(pid) if pid else 0.0
                            r = load(urls, c, phase, seconds)
                            cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
                            done = r["all_requests"]
                            r["cpu_ms"] = 1000 * cpu / done if pid and done else float("nan")
                            r["target"] = name
                            cells.setdefault((c, name), []).append(r)
                            print(cell_line(phase.name, r), flush=True)
                rows += [median_of(cells[(c, name)]) for c in clients for name in targets]
                if args.py_spy and "fairway" in targets:
                    urls, pid = targets["fairway"]
                    out = Path(args.py_spy) / f"fairway-{phase.name}-{max(clients)}.txt"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    assert pid is not None
                    profile(pid, urls, max(clients), phase, seconds, out)

    data = {
        "measured_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": "make bench-all" if args.litellm and args.vllm_router else "make bench",
        "seconds": seconds,
        "rounds": rounds,
        "results": results,
    }
    if args.quick:
        print("\n".join(render(data, TITLES)))
        return
    raw = Path(args.output).with_name("gateway_overhead.json")
    raw.write_text(json.dumps(data, indent=1) + "\n")
    write_report(data, TITLES, Path(args.output))


if __name__ == "__main__":
    main()
