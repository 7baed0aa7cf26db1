"""Several gateway processes sharing state through one real redis-server.

- workers: requests per second at 512 concurrent streams through `fairway serve --workers 1`
  and `--workers 2` (SO_REUSEPORT, Redis backend), and one process on the memory backend, in
  front of the same simulated engines (1000x faster than modelled, so the gateway is the
  bottleneck), side by side in one run;
- fairness: three replicas in front of the same two engines, tenant acme (weight 1) flooding
  replicas 0 and 1 and globex (weight 2) flooding replica 2: the service each receives
  (prompt tokens + 2 x output tokens, the fairness prices), with the fairness shared through
  Redis and with each replica deciding alone (memory backend).

Writes its section of docs/BENCHMARKS.md with the machine it ran on.

    .venv/bin/python benchmarks/replicas.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from _common import engine_table, free_port, machine, splice_section, toml_table, wait_ready
from gateway_overhead import KEY, KEY_DIGEST, MODEL, PY, ROOT, Phase, load, process

DOC = ROOT / "docs" / "BENCHMARKS.md"
GLOBEX = "sk-globex-chat"  # the second tenant's key in the fairness run


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


def config(
    engines: list[str], redis: str | None, *, slots: int | None = None, sync_s: float = 0.05
) -> str:
    import hashlib

    globex = hashlib.sha256(GLOBEX.encode()).hexdigest()
    fields: dict[str, Any] = {"kind": "vllm"}
    if slots is not None:
        fields["max_running"] = slots
    tables = [
        toml_table("logging", {"level": "warning"}),
        toml_table("fairness", {"queue_timeout_s": 300.0}),
        toml_table("tenants.acme", {"max_concurrent": 0, "apps.chat": {},
                                    "keys": [{"sha256": KEY_DIGEST, "app": "chat"}]}),
        toml_table("tenants.globex", {"weight": 2.0, "max_concurrent": 0, "apps.chat": {},
                                      "keys": [{"sha256": globex, "app": "chat"}]}),
        *(engine_table("local", MODEL, url=url, **fields) for url in engines),
    ]  # fmt: skip
    if redis is not None:
        tables.insert(0, toml_table("state", {"backend": "redis", "redis_url": redis,
                                              "sync_interval_s": sync_s}))  # fmt: skip
    return "\n".join(tables) + "\n"


@contextlib.contextmanager
def gateway(cfg: str, work: Path, name: str, workers: int = 1) -> Iterator[str]:
    path = work / f"{name}.toml"
    path.write_text(cfg)
    port = free_port()
    cmd = [PY, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port),
           "--workers", str(workers)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with process(cmd, f"{url}/healthz", work / f"{name}.log"):
        yield url


@contextlib.contextmanager
def engines(work: Path, n: int, scale: float, seqs: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        urls = []
        for i in range(n):
            port = free_port()
            cmd = [PY, "-m", "gateway.cli", "sim", "--port", str(port), "--seed", str(i),
                   "--time-scale", str(scale), "--max-num-seqs", str(seqs)]  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(process(cmd, f"{url}/health", work / f"engine{n}-{i}.log"))
            urls.append(url)
        yield urls


def workers_run(work: Path, redis: str, seconds: float, streams: int) -> list[dict[str, Any]]:
    phase = Phase("saturated", 0.001, 16, 0.0, "")
    rows = []
    with engines(work, 2, phase.time_scale, 1024) as urls:
        for label, backend, workers in [("1 process, memory", None, 1),
                                        ("1 worker, Redis", redis, 1),
                                        ("2 workers, Redis", redis, 2)]:  # fmt: skip
            with gateway(config(urls, backend), work, f"w{workers}{bool(backend)}", workers) as u:
                wait_ready(f"{u}/healthz")
                load([u], 16, phase, 2.0)  # warm
                r = load([u], streams, phase, seconds)
                rows.append({"setup": label, **r})
                print(label, f"{r['rps']:.0f} rps", file=sys.stderr)
    return rows


async def flood(base: str, key: str, until: float, since: float, n: int) -> float:
    body = {"model": MODEL, "prompt": "fair " * 120, "max_tokens": 48, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"}
    service = 0.0
    loop = asyncio.get_running_loop()

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal service
        while loop.time() < until:
            async with http.post(f"{base}/v1/completions", json=body, headers=headers) as r:
                data = await r.json()
                if r.status != 200:
                    await asyncio.sleep(0.1)
                    continue
            if loop.time() > since:
                u = data["usage"]
                service += u["prompt_tokens"] + 2 * u["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(n)))
    return service


def fairness_run(work: Path, redis: str, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with engines(work, 2, 0.4, 4) as urls:
        for label, backend in [("shared through Redis", redis), ("each replica alone", None)]:
            cfg = config(urls, backend, slots=4)
            with contextlib.ExitStack() as stack:
                bases = [stack.enter_context(gateway(cfg, work, f"f{i}{bool(backend)}"))
                         for i in range(3)]  # fmt: skip

                async def run(bases: list[str] = bases) -> tuple[float, float]:
                    loop = asyncio.get_running_loop()
                    since, until = loop.time() + 5.0, loop.time() + 5.0 + seconds
                    a0, a1, globex = await asyncio.gather(
                        flood(bases[0], KEY, until, since, 8),
                        flood(bases[1], KEY, until, since, 8),
                        flood(bases[2], GLOBEX, until, since, 16),
                    )
                    return a0 + a1, globex

                acme, globex = asyncio.run(run())
                rows.append({"setup": label, "acme": acme, "globex": globex,
                             "ratio": globex / acme if acme else float("nan")})  # fmt: skip
                print(label, rows[-1], file=sys.stderr)
    return rows


def render(
    args: argparse.Namespace, workers: list[dict[str, Any]], fair: list[dict[str, Any]]
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    base = workers[0]["rps"]
    lines = [
        "<!-- replicas -->",
        "## Replicas and workers sharing state through Redis",
        "",
        f"`.venv/bin/python benchmarks/replicas.py` ({when}; {machine()}). Gateways, simulated "
        "engines, redis-server and the load generators are separate processes sharing this "
        "machine's two cores.",
        "",
        f"**Workers**: {args.streams} concurrent streams, engines 1000x faster than modelled, "
        f"16 output tokens ({args.seconds:g} s measured):",
        "",
        "| setup | requests/s | vs 1 process | TTFT p50 (ms) | errors |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['setup']} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | "
          f"{r['ttft_p50_ms']:.1f} | {r['errors']} |" for r in workers),
        "",
        "**Fairness over three replicas**: acme (weight 1) floods replicas 0 and 1 with 8 "
        "clients each, globex (weight 2) floods replica 2 with 16; two engines of 4 slots; "
        f"service in the {args.seconds:g} s after a 5 s warm-up (target with shared fairness: "
        "globex/acme within 5% of 2):",
        "",
        "| fairness | acme service | globex service | globex / acme |",
        "|---|---:|---:|---:|",
        *(f"| {r['setup']} | {r['acme']:,.0f} | {r['globex']:,.0f} | {r['ratio']:.3f} |"
          for r in fair),
        "<!-- /replicas -->",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--streams", type=int, default=512)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with redis_server(work) as redis:
            workers = workers_run(work, redis, args.seconds, args.streams)
            fair = fairness_run(work, redis, args.seconds)
    section = render(args, workers, fair)
    print(section)
    if not args.no_write:
        DOC.write_text(splice_section(DOC.read_text() if DOC.exists() else "", "replicas", section))
        print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
