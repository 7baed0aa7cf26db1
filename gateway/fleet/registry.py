"""The fleet as the gateway sees it: engines by model, their health and their load.

`EngineState` is mutable and owned by the gateway's event loop; policies only ever see the
frozen `EngineSnapshot` taken from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.core.ledger import EngineSnapshot


@dataclass(slots=True, eq=False)
class EngineState:
    id: str
    region: str
    model: str
    url: str
    api_key: str | None = None
    healthy: bool = True
    failures: int = 0  # consecutive failed probes or connections
    successes: int = 0  # consecutive good probes while ejected
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0
    in_flight_prompt_tokens: int = 0
    in_flight_decode_tokens: int = 0
    recent_prompt_rate: float = 0.0
    recent_prompt_at: float = 0.0

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            self.id, self.region, self.model, self.healthy, self.running, self.waiting,
            self.kv_usage, self.in_flight, self.in_flight_prompt_tokens,
            self.in_flight_decode_tokens, self.recent_prompt_rate, self.recent_prompt_at,
        )  # fmt: skip


class EngineRegistry:
    """Engines grouped by model, with passive (proxy errors) and active (probes) health."""

    def __init__(
        self, engines: Iterable[EngineState], unhealthy_after: int = 2, healthy_after: int = 1
    ) -> None:
        self.engines: dict[str, EngineState] = {}
        self.by_model: dict[str, list[EngineState]] = {}
        for e in engines:
            self.engines[e.id] = e
            self.by_model.setdefault(e.model, []).append(e)
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after

    @property
    def models(self) -> list[str]:
        return sorted(self.by_model)

    def snapshots(self, model: str, exclude: Iterable[str] = ()) -> list[EngineSnapshot]:
        """Healthy engines of `model`, less those already tried for this request."""
        skip = set(exclude)
        return [
            e.snapshot() for e in self.by_model.get(model, ()) if e.healthy and e.id not in skip
        ]

    def probe_ok(self, engine: EngineState) -> bool:
        """Record a good probe; returns True when it re-admits the engine."""
        engine.failures = 0
        if engine.healthy:
            return False
        engine.successes += 1
        if engine.successes >= self.healthy_after:
            engine.healthy = True
            engine.successes = 0
            return True
        return False

    def probe_failed(self, engine: EngineState) -> bool:
        """Record a failed probe; returns True when it ejects the engine."""
        engine.successes = 0
        engine.failures += 1
        if engine.healthy and engine.failures >= self.unhealthy_after:
            engine.healthy = False
            return True
        return False

    def connect_failed(self, engine: EngineState) -> bool:
        """A request could not reach the engine: eject it now; probes re-admit it."""
        engine.successes = 0
        engine.failures = max(engine.failures + 1, self.unhealthy_after)
        was = engine.healthy
        engine.healthy = False
        return was
