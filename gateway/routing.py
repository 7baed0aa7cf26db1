"""Routing policies: pick one engine of the requested model for a request.

Pure and synchronous, behind one protocol, so the gateway and the cluster simulator run the
same objects. The routing issue adds predicted-latency routing and the other baselines here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from engines.registry import EngineSnapshot
from gateway.request import RequestInfo


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        """Return the id of one of `engines` (never empty)."""
        ...


class LeastOutstanding:
    """Fewest requests the gateway has open at the engine; the engine's own queue and KV use
    break ties, then rotation, so that equal engines share the load."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        self._turn += 1
        n = len(engines)
        best = min(
            range(n),
            key=lambda i: (
                engines[i].in_flight,
                engines[i].waiting,
                engines[i].kv_usage,
                (i - self._turn) % n,
            ),
        )
        return engines[best].id


POLICIES: dict[str, type[LeastOutstanding]] = {LeastOutstanding.name: LeastOutstanding}
