"""What the gateway has in flight per engine, and the snapshots policies decide on.

One `Ledger` per gateway (and per simulation) is the only count of in-flight work: the
dispatcher's limits, the router's snapshots and the proxy's retries all read and write it. A
charge is keyed by a gateway-internal handle (an integer the gate core hands out), never by
anything a client sends, so two requests that share an `X-Request-Id` are two charges. A retry
moves its charge to the new engine; a finished request releases it; an engine's entry goes when
the engine leaves the fleet, and not before its last charge is released.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Time constant of the recent prompt rate per engine: long enough to smooth single requests,
# short against the minutes over which load shifts.
PROMPT_RATE_WINDOW_S = 30.0


def recent_rate(rate: float, at: float, now: float) -> float:
    """`rate` (per second, as of `at`) decayed to `now`."""
    return rate * math.exp(-(now - at) / PROMPT_RATE_WINDOW_S) if now > at else rate


def add_prompt(rate: float, at: float, now: float, tokens: int) -> tuple[float, float]:
    """The recent prompt rate and its time after `tokens` more were sent at `now`."""
    return recent_rate(rate, at, now) + tokens / PROMPT_RATE_WINDOW_S, max(at, now)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSnapshot:
    """One engine as a routing decision sees it: its scraped gauges and the ledger's load."""

    id: str
    region: str
    model: str
    healthy: bool = True
    running: int = 0  # scraped from the engine (vllm:num_requests_running)
    waiting: int = 0  # scraped (vllm:num_requests_waiting)
    kv_usage: float = 0.0  # scraped (vllm:kv_cache_usage_perc), 0..1
    in_flight: int = 0  # requests the gateway has open there now
    # Requests the gateway had open there when the gauges were scraped: those of the scraped
    # running + waiting that are its own, the rest being other clients' load.
    in_flight_at_scrape: int = 0
    in_flight_prompt_tokens: int = 0
    # Output tokens the gateway expects from what it has in flight there (predicted lengths).
    in_flight_decode_tokens: int = 0
    # Prompt tokens per second the gateway has sent there lately (exponentially decayed), as
    # of time `recent_prompt_at`: how much of the engine's time prefill takes.
    recent_prompt_rate: float = 0.0
    recent_prompt_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLimit:
    """The gateway's own in-flight limits for an engine."""

    max_running: int
    max_tokens: int = 0  # prompt + expected output tokens in flight; 0 = no limit


@dataclass(slots=True)
class EngineLoad:
    """What the gateway has in flight at one engine.

    With several replicas (shared state, last synced) `others` and `others_kv_tokens` are
    what the other replicas hold there, counted at least at their share while they have
    requests waiting, and `guaranteed` is this replica's share: the slots of the engine's
    limit it may fill whatever the others report, so that replicas deciding at once on the
    same stale view cannot together fill an engine more than once over."""

    limit: EngineLimit
    requests: int = 0
    prompt_tokens: int = 0
    decode_tokens: int = 0  # predicted output tokens
    kv_tokens: int = 0  # prompt + expected output: what `limit.max_tokens` bounds
    prompt_rate: float = 0.0
    prompt_at: float = 0.0
    others: int = 0
    others_kv_tokens: int = 0
    guaranteed: int = 0

    def has_room(self, tokens: int) -> bool:
        """Room for one more request of `tokens` (prompt + expected output). An engine with
        nothing in flight takes any request: a huge one must not wait forever."""
        mine, requests = self.requests, self.requests + self.others
        if mine < self.guaranteed:
            return True
        if requests >= self.limit.max_running:
            return False
        lim = self.limit.max_tokens
        return not lim or requests == 0 or self.kv_tokens + self.others_kv_tokens + tokens <= lim

    def share(self) -> float:
        """How full the engine is against its limits, 0..1 (or more)."""
        s = (self.requests + self.others) / self.limit.max_running
        if self.limit.max_tokens:
            s = max(s, (self.kv_tokens + self.others_kv_tokens) / self.limit.max_tokens)
        return s


@dataclass(frozen=True, slots=True)
class Charge:
    engine: str
    prompt_tokens: int
    decode_tokens: int
    kv_tokens: int


class Ledger:
    """In-flight work per engine, charged per gateway-internal handle."""

    def __init__(self) -> None:
        self.loads: dict[str, EngineLoad] = {}
        self._charges: dict[int, Charge] = {}

    def add_engine(self, engine: str, limit: EngineLimit) -> None:
        """A new engine, or new limits for a known one (its load is kept)."""
        load = self.loads.get(engine)
        if load is None:
            self.loads[engine] = EngineLoad(limit)
        else:
            load.limit = limit

    def remove_engine(self, engine: str) -> None:
        """Forget an engine; charges still on it are released with it."""
        self.loads.pop(engine, None)
        for h in [h for h, c in self._charges.items() if c.engine == engine]:
            del self._charges[h]

    def charge(self, handle: int, engine: str, *, prompt_tokens: int, decode_tokens: int,
               kv_tokens: int, now: float) -> None:  # fmt: skip
        """Put `handle`'s request on `engine`; a charge it had elsewhere (a retry) leaves."""
        self.release(handle)
        self._put(handle, Charge(engine, prompt_tokens, decode_tokens, kv_tokens), now)

    def _put(self, handle: int, c: Charge, now: float) -> None:
        load = self.loads[c.engine]
        load.requests += 1
        load.prompt_tokens += c.prompt_tokens
        load.decode_tokens += c.decode_tokens
        load.kv_tokens += c.kv_tokens
        load.prompt_rate, load.prompt_at = add_prompt(
            load.prompt_rate, load.prompt_at, now, c.prompt_tokens
        )
        self._charges[handle] = c

    def release(self, handle: int) -> str | None:
        """The request ended (or moves): its charge leaves its engine, which is returned."""
        c = self._charges.pop(handle, None)
        if c is None:
            return None
        load = self.loads.get(c.engine)
        if load is not None:
            load.requests -= 1
            load.prompt_tokens -= c.prompt_tokens
            load.decode_tokens -= c.decode_tokens
            load.kv_tokens -= c.kv_tokens
        return c.engine

    def engine_of(self, handle: int) -> str | None:
        c = self._charges.get(handle)
        return None if c is None else c.engine

    def in_flight(self, engine: str) -> int:
        load = self.loads.get(engine)
        return 0 if load is None else load.requests

    def total(self) -> int:
        """Requests in flight anywhere: zero whenever the gateway is idle."""
        return len(self._charges)
