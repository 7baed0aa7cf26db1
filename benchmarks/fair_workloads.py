"""Workloads for the fairness evaluation: VTC's synthetic ones and a multi-tenant mix built on
the Azure LLM conversation trace. A workload is a list of arrivals; rates are given relative to
the measured capacity of the simulated fleet so that "overload" means the same on any preset."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from _common import TRACE, read_trace


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float
    tenant: str
    app: str
    prompt_tokens: int
    output_tokens: int
    interaction: str | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    title: str
    arrivals: list[Arrival]
    weights: dict[str, float]
    duration_s: float
    engines: int  # engines of the fleet it is sized for
    abuser: str | None = None
    gpu: str = "A100"
    max_running: int = 32  # the gateway's in-flight limit per engine


def poisson(rng: random.Random, rate: float, t0: float, t1: float) -> list[float]:
    out, t = [], t0
    while True:
        t += rng.expovariate(rate)
        if t >= t1:
            return out
        out.append(t)


def _fixed(tenant: str, times: list[float], prompt: int = 256, output: int = 256) -> list[Arrival]:
    return [Arrival(t, tenant, "chat", prompt, output) for t in times]


def _one_engine(
    name: str, title: str, arrivals: list[Arrival], weights: dict[str, float], duration: float
) -> Workload:
    """A synthetic workload sized for one engine, its arrivals in time order."""
    return Workload(name, title, sorted(arrivals, key=lambda x: x.t), weights, duration, 1)


def two_clients(capacity: float, duration: float, seed: int = 1) -> Workload:
    """VTC's first synthetic workload: two clients both above their half, one sending twice
    as fast (VTC: 1.5 and 3 req/s); 256 prompt and 256 output tokens each."""
    rng = random.Random(seed)
    a = _fixed("A", poisson(rng, 0.6 * capacity, 0, duration))
    b = _fixed("B", poisson(rng, 1.2 * capacity, 0, duration))
    return _one_engine(
        "two-clients", "Two clients overloading, 1:2 (VTC)", a + b, {"A": 1.0, "B": 1.0}, duration
    )


def on_off(capacity: float, duration: float, seed: int = 2) -> Workload:
    """A steady overloading client and one that sends as much, but only every other minute."""
    rng = random.Random(seed)
    a = _fixed("A", poisson(rng, 1.2 * capacity, 0, duration))
    b: list[Arrival] = []
    for start in range(0, int(duration), 120):
        b += _fixed("B", poisson(rng, 1.2 * capacity, start, min(duration, start + 60)))
    return _one_engine(
        "on-off", "Steady client and an on/off client (VTC)", a + b, {"A": 1.0, "B": 1.0}, duration
    )


def weighted(capacity: float, duration: float, seed: int = 3) -> Workload:
    """Three clients with weights 1, 2 and 4, each sending as much as the whole engine serves."""
    rng = random.Random(seed)
    weights = {"w1": 1.0, "w2": 2.0, "w4": 4.0}
    arrivals = [a for t in weights for a in _fixed(t, poisson(rng, capacity, 0, duration))]
    return _one_engine("weighted", "Weighted shares 1:2:4", arrivals, weights, duration)


def load_trace(path: Path = TRACE) -> list[tuple[float, int, int]]:
    """(seconds since the first request, prompt tokens, output tokens) per row."""
    rows = sorted((ts.timestamp(), prompt, output) for ts, prompt, output in read_trace(path))
    t0 = rows[0][0]
    return [(t - t0, p, o) for t, p, o in rows]


TRACE_TENANTS = ("alpha", "bravo", "charlie", "delta", "abuser", "agentco")


def azure_mix(
    rows: list[tuple[float, int, int]],
    speedup: float,
    engines: int,
    abuse: bool,
    gpu: str = "H100",
    max_running: int = 64,
    seed: int = 4,
    calls: int = 4,
    think_s: float = 2.0,
) -> Workload:
    """The trace's requests dealt to six tenants of equal weight and share, `speedup` times
    faster. `agentco` runs an agent: each of its rows opens an interaction of `calls` calls,
    `think_s` apart, keeping its share by taking every `calls`-th of its rows. With `abuse`, the
    tenant `abuser` sends ten times its share: nine more copies of its share, jittered."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    agent_rows = 0
    for i, (t, p, o) in enumerate(rows):
        t /= speedup
        tenant = TRACE_TENANTS[rng.randrange(len(TRACE_TENANTS))]
        if tenant == "agentco":
            agent_rows += 1
            if agent_rows % calls == 0:
                out += [
                    Arrival(t + k * think_s, tenant, "agent", p, o, f"task-{i}")
                    for k in range(calls)
                ]
            continue
        out.append(Arrival(t, tenant, "chat", p, o))
        if abuse and tenant == "abuser":
            out += [Arrival(t + rng.uniform(-30, 30), tenant, "chat", p, o) for _ in range(9)]
    duration = rows[-1][0] / speedup
    out = sorted((a for a in out if 0 <= a.t < duration), key=lambda x: x.t)
    return Workload(
        "azure-abuse" if abuse else "azure-calm",
        "Azure trace, 6 tenants" + (", one sending 10x its share" if abuse else ""),
        out, dict.fromkeys(TRACE_TENANTS, 1.0), duration, engines,
        "abuser" if abuse else None, gpu, max_running,
    )  # fmt: skip
