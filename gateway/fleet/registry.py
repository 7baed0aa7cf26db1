"""The fleet as the gateway sees it: engines by model, their health, state and scraped load.

`EngineState` is mutable and owned by the gateway's event loop; what the gateway has in
flight there is the gate core's ledger (`gateway.core.ledger`), not counted here. Engines
join, drain and leave while the gateway serves: `add` and `remove` keep every index in step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class EngineMode(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"  # takes no new requests; removed when its last stream ends


@dataclass(slots=True, eq=False, kw_only=True)
class EngineState:
    id: str
    region: str
    model: str
    url: str
    kind: str = "vllm"
    api_key: str | None = None
    mode: EngineMode = EngineMode.ACTIVE
    healthy: bool = True
    failures: int = 0  # consecutive failed probes or connections
    successes: int = 0  # consecutive good probes while ejected
    # The 5xx circuit breaker: closed (healthy, not half-open), open (ejected), or half-open
    # (re-admitted by probes, on trial: its first 5xx opens it again, `healthy_after` good
    # answers close it).
    http_5xx: int = 0  # consecutive 5xx answers to requests
    half_open: bool = False
    trial_ok: int = 0  # good answers (status < 500) while half-open
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight_at_scrape: int = 0  # the gateway's own requests there when the gauges were read
    # time.monotonic() when a response from it last arrived whole: an engine that finishes
    # requests is alive, whatever a probe that timed out behind its load says.
    completed_at: float = -math.inf

    @property
    def routable(self) -> bool:
        """New requests may go here."""
        return self.healthy and self.mode is EngineMode.ACTIVE

    @property
    def state(self) -> str:
        """`active`, `half_open` (re-admitted, on trial: its first 5xx ejects it again),
        `draining` or `ejected` (unhealthy), as the admin API shows it."""
        if self.mode is EngineMode.DRAINING:
            return "draining"
        if not self.healthy:
            return "ejected"
        return "half_open" if self.half_open else "active"


class EngineRegistry:
    """Engines grouped by model, with passive (proxy errors) and active (probes) health."""

    def __init__(
        self, engines: Iterable[EngineState] = (), unhealthy_after: int = 2, healthy_after: int = 1
    ) -> None:
        self.engines: dict[str, EngineState] = {}
        self.by_model: dict[str, list[EngineState]] = {}
        for e in engines:
            self.add(e)
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after

    def add(self, engine: EngineState) -> None:
        if engine.id in self.engines:
            raise ValueError(f"engine {engine.id!r} is already in the fleet")
        self.engines[engine.id] = engine
        self.by_model.setdefault(engine.model, []).append(engine)

    def remove(self, engine_id: str) -> EngineState | None:
        e = self.engines.pop(engine_id, None)
        if e is not None:
            same = self.by_model[e.model]
            same.remove(e)
            if not same:
                del self.by_model[e.model]
        return e

    @property
    def models(self) -> list[str]:
        """Models that at least one engine taking new requests serves."""
        return sorted(m for m, es in self.by_model.items() if any(e.mode is EngineMode.ACTIVE
                                                                  for e in es))  # fmt: skip

    def engines_of(self, model: str) -> list[EngineState]:
        """Every engine of `model`, in the order they joined (routable or not)."""
        return self.by_model.get(model, [])

    def probe_ok(self, engine: EngineState) -> bool:
        """Record a good probe; returns True when it re-admits the engine, half-open."""
        engine.failures = 0
        if engine.healthy:
            return False
        engine.successes += 1
        if engine.successes >= self.healthy_after:
            engine.healthy = True
            engine.successes = 0
            engine.half_open, engine.trial_ok = True, 0  # on trial until it answers well
            return True
        return False

    def probe_failed(self, engine: EngineState) -> bool:
        """Record a failed probe; returns True when it ejects the engine."""
        engine.successes = 0
        engine.failures += 1
        if engine.healthy and engine.failures >= self.unhealthy_after:
            self._eject(engine)
            return True
        return False

    def connect_failed(self, engine: EngineState) -> bool:
        """A request could not reach the engine: eject it now; probes re-admit it."""
        engine.successes = 0
        engine.failures = max(engine.failures + 1, self.unhealthy_after)
        was = engine.healthy
        self._eject(engine)
        return was

    def answered(self, engine: EngineState) -> bool:
        """An answer under 500 to a request; returns True when it closes a half-open breaker."""
        engine.http_5xx = 0
        if not engine.half_open:
            return False
        engine.trial_ok += 1
        if engine.trial_ok >= self.healthy_after:
            engine.half_open, engine.trial_ok = False, 0
            return True
        return False

    def answered_5xx(self, engine: EngineState, eject_after: int) -> bool:
        """A 5xx answer to a request; returns True when it ejects the engine (opens the
        breaker): at once while half-open, else after `eject_after` in a row."""
        engine.http_5xx += 1
        if engine.healthy and (engine.half_open or engine.http_5xx >= eject_after):
            self._eject(engine)
            return True
        return False

    @staticmethod
    def _eject(engine: EngineState) -> None:
        engine.healthy = False
        engine.half_open = False
        engine.successes = engine.trial_ok = 0
