"""Closed-loop streaming load: C clients each send one streaming chat request after another.

Run as its own process so that its CPU is not the measured server's. Prints one JSON object:
TTFT and end-to-end latency percentiles (ms) and requests per second of the requests that
finished after the warm-up, and the errors.

    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --key sk-acme-chat \
        --model llama-3.1-8b --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from typing import Any

import aiohttp
import orjson
import uvloop
from _common import percentile


async def run(args: argparse.Namespace) -> dict[str, Any]:
    urls = itertools.cycle([u.rstrip("/") + "/v1/chat/completions" for u in args.url])
    body = orjson.dumps(
        {
            "model": args.model,
            "messages": [{"role": "user", "content": "Tell me about load balancing. " * 4}],
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
    )
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    done: list[tuple[float, float, float, int]] = []  # (sent, finished, ttft, events)
    errors: list[tuple[float, str]] = []  # (finished, kind)
    start = time.perf_counter()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    rng = random.Random(args.seed)

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            # A random pause before each request spreads arrivals over the engines' step
            # cycle; without it a closed loop locks onto the steps and latency added in front
            # of the engine can even shorten the time to first token.
            await asyncio.sleep(rng.uniform(0, args.jitter_ms / 1000))
            t0 = time.perf_counter()
            ttft = None
            finished = False
            n = 0
            try:
                async with session.post(next(urls), data=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        errors.append((time.perf_counter(), f"http_{resp.status}"))
                        await asyncio.sleep(0.05)
                        continue
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            n += 1
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                        elif line.startswith(b"data: [DONE]"):
                            finished = True
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors.append((time.perf_counter(), type(exc).__name__))
                continue
            end = time.perf_counter()
            if not finished or ttft is None:
                errors.append((end, "incomplete_stream"))
                continue
            done.append((t0, end, ttft, n))

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
    # Every request that finished after the warm-up counts, including those still running
    # when the clients stopped sending: a proxy slower than the window is measured too.
    counted = [d for d in done if d[1] >= measure_from]
    last = max((d[1] for d in counted), default=stop_at)
    ttfts = [d[2] for d in counted]
    e2es = [d[1] - d[0] for d in counted]
    kinds: dict[str, int] = {}
    for finished_at, kind in errors:
        if finished_at >= measure_from:
            kinds[kind] = kinds.get(kind, 0) + 1
    ms = 1000.0
    return {
        "concurrency": args.concurrency,
        "requests": len(counted),
        "all_requests": len(done),
        "rps": len(counted) / max(last - measure_from, args.duration),
        "ttft_p50_ms": percentile(ttfts, 50) * ms,
        "ttft_p99_ms": percentile(ttfts, 99) * ms,
        "e2e_p50_ms": percentile(e2es, 50) * ms,
        "e2e_p99_ms": percentile(e2es, 99) * ms,
        "events_per_request": sum(d[3] for d in counted) / len(counted) if counted else 0.0,
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", action="append", required=True, help="repeat to spread over several")
    p.add_argument("--key", default="none")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--jitter-ms", type=float, default=20.0, help="random pause before a request")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
