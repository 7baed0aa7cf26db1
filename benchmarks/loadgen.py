"""Closed-loop streaming load: C clients each send one streaming chat request after another.

Run as its own process so that its CPU is not the measured server's. Prints one JSON object:
TTFT and end-to-end latency percentiles (ms) of the requests sent in the measured window,
requests per second finished in it, and errors.

    python benchmarks/loadgen.py --url http://127.0.0.1:8080 --key sk-acme-chat \
        --model llama-3.1-8b --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from typing import Any

import aiohttp
import orjson
import uvloop


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


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
    ttfts: list[float] = []
    e2es: list[float] = []
    errors: dict[str, int] = {}
    done = 0
    events = 0
    start = time.perf_counter()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    def error(kind: str, t0: float) -> None:
        if t0 >= measure_from:
            errors[kind] = errors.get(kind, 0) + 1

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, events
        while (t0 := time.perf_counter()) < stop_at:
            ttft = None
            finished = False
            n = 0
            try:
                async with session.post(next(urls), data=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        error(f"http_{resp.status}", t0)
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
                error(type(exc).__name__, t0)
                continue
            end = time.perf_counter()
            if not finished or ttft is None:
                error("incomplete_stream", t0)
                continue
            # Latency of requests sent in the window, however long they take; throughput from
            # requests that finished in it, so a proxy slower than the window still counts.
            if t0 >= measure_from:
                ttfts.append(ttft)
                e2es.append(end - t0)
                events += n
            if measure_from <= end <= stop_at:
                done += 1

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
    ms = 1000.0
    return {
        "concurrency": args.concurrency,
        "requests": done,
        "rps": done / args.duration,
        "ttft_p50_ms": percentile(ttfts, 50) * ms,
        "ttft_p99_ms": percentile(ttfts, 99) * ms,
        "e2e_p50_ms": percentile(e2es, 50) * ms,
        "e2e_p99_ms": percentile(e2es, 99) * ms,
        "events_per_request": events / len(e2es) if e2es else 0.0,
        "errors": sum(errors.values()),
        "error_kinds": errors,
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
    args = p.parse_args()
    result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
