"""Routing policies: pick one engine of the requested model for a request.

Pure and synchronous, behind one protocol, so the gateway and the cluster simulator run the
same objects. This module holds the protocol, the baselines and the factory that builds the
configured policy; the workload-aware policy lives in `gateway.routing.latency`.

Every policy sees only `EngineSnapshot`s: the gateway's own in-flight view of an engine (fresh)
and the gauges it scraped from the engine's `/metrics` (as old as the last probe).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from gateway.core.ledger import EngineSnapshot
from gateway.core.request import RequestInfo


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        """Return the id of one of `engines` (never empty)."""
        ...


class RoundRobin:
    """Each engine in turn, whatever its load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = -1

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        self._turn += 1
        return engines[self._turn % len(engines)].id


class _Rotating:
    """Least of a load key; rotation breaks ties so that equal engines share the load."""

    name = ""

    def __init__(self) -> None:
        self._turn = 0

    def load(self, request: RequestInfo, e: EngineSnapshot) -> tuple[float, ...]:
        raise NotImplementedError

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        self._turn += 1
        n, turn = len(engines), self._turn
        best = min(range(n), key=lambda i: (*self.load(request, engines[i]), (i - turn) % n))
        return engines[best].id


class LeastOutstanding(_Rotating):
    """Fewest requests the gateway has open at the engine; the engine's own queue and KV use
    break ties, then rotation."""

    name = "least-outstanding"

    def load(self, request: RequestInfo, e: EngineSnapshot) -> tuple[float, ...]:
        return (e.in_flight, e.waiting, e.kv_usage)


class ShortestQueue(_Rotating):
    """Join the shortest queue as the engine reports it (running + waiting, scraped), the
    usual baseline of routers that read vLLM's metrics; the gateway's count breaks ties."""

    name = "jsq"

    def load(self, request: RequestInfo, e: EngineSnapshot) -> tuple[float, ...]:
        return (e.running + e.waiting, e.in_flight)


class LeastTokens(_Rotating):
    """Fewest outstanding tokens: prompt tokens in flight plus the output tokens expected of
    the requests in flight (the predictor's lengths, when one is configured)."""

    name = "least-tokens"

    def load(self, request: RequestInfo, e: EngineSnapshot) -> tuple[float, ...]:
        return (e.in_flight_prompt_tokens + e.in_flight_decode_tokens, e.in_flight)


class PowerOfTwo:
    """Two engines drawn at random; the one with fewer requests in flight (Mitzenmacher)."""

    name = "power-of-two"

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        n = len(engines)
        if n == 1:
            return engines[0].id
        i, j = self._rng.sample(range(n), 2)
        a, b = engines[i], engines[j]
        return a.id if (a.in_flight, a.waiting) <= (b.in_flight, b.waiting) else b.id


# The registry of routing policies by their `[routing] policy` names: config validation and
# `gateway.routing.latency.build_policy` both read it, so that a new baseline is one entry here.
# Baselines need nothing to be built.
BASELINES: Mapping[str, Callable[[], RoutingPolicy]] = {
    RoundRobin.name: RoundRobin,
    ShortestQueue.name: ShortestQueue,
    LeastTokens.name: LeastTokens,
    PowerOfTwo.name: PowerOfTwo,
    LeastOutstanding.name: LeastOutstanding,
}
# The workload-aware policy needs the engines' performance profiles; it lives in
# gateway.routing.latency, which imports this module, so only its name is registered here.
PREDICTED_LATENCY = "predicted-latency"
POLICY_NAMES: tuple[str, ...] = (PREDICTED_LATENCY, *BASELINES)
