"""The gateway's queue: requests wait only while every engine of their model is saturated.

An engine is saturated when what the gateway has in flight there reaches its limits (running
sequences, and KV tokens counted as prompt plus expected output). Then a request waits in its
model's fairness policy; when a slot frees, the policy picks who goes next and the router picks
where among the engines with room. The slot is reserved the moment a request is picked, so a
new arrival cannot take it from a request woken from the queue.

Pure and synchronous: the gateway wraps each waiting ticket in a future, the cluster simulator
in a job; both call the same `Dispatcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from gateway.config.schema import Config
from gateway.core.fairness import FairnessPolicy, Prices, Ticket, make_policy
from gateway.core.ledger import EngineSnapshot


@dataclass(frozen=True, slots=True)
class EngineLimit:
    max_running: int
    max_tokens: int = 0  # prompt + expected output tokens in flight; 0 = no limit


@dataclass(slots=True)
class Load:
    running: int = 0
    tokens: int = 0


class Decision(Enum):
    START = "start"  # an engine has room: `ticket_engine` says which
    QUEUED = "queued"
    FULL = "full"  # the tenant's queue is at its limit
    UNAVAILABLE = "unavailable"  # no healthy engine serves the model: waiting would not help


Route = Callable[[Ticket, list[EngineSnapshot]], str]
Snapshots = Callable[[str], list[EngineSnapshot]]


class Dispatcher:
    """Fairness queues per model over the gateway's own count of engine load."""

    def __init__(
        self,
        policy: Callable[[str], FairnessPolicy],
        limits: Mapping[str, EngineLimit],
        snapshots: Snapshots,
        route: Route,
        max_queue_per_tenant: int,
        overload_at: float = 1.0,
    ) -> None:
        self._new_policy = policy
        self.limits = limits
        self.snapshots = snapshots
        self.route = route
        self.max_queue = max_queue_per_tenant
        self.overload_at = overload_at
        self.policies: dict[str, FairnessPolicy] = {}
        self.load: dict[str, Load] = {eid: Load() for eid in limits}
        self.engine_of: dict[str, str] = {}  # rid -> engine, while in flight

    def policy(self, model: str) -> FairnessPolicy:
        p = self.policies.get(model)
        if p is None:
            p = self.policies[model] = self._new_policy(model)
        return p

    def _room(self, engine: str, t: Ticket) -> bool:
        lim, load = self.limits[engine], self.load[engine]
        if load.running >= lim.max_running:
            return False
        # An engine with nothing in flight takes any request: a huge one must not wait forever.
        cost = t.prompt_tokens + t.expected_output
        return not lim.max_tokens or load.running == 0 or load.tokens + cost <= lim.max_tokens

    def open_engines(
        self, model: str, t: Ticket, healthy: list[EngineSnapshot] | None = None
    ) -> list[EngineSnapshot]:
        """The healthy engines of `model` with room for `t` (`healthy`: snapshots already
        taken for this decision)."""
        snaps = self.snapshots(model) if healthy is None else healthy
        return [s for s in snaps if s.id in self.limits and self._room(s.id, t)]

    def utilisation(self, model: str) -> float:
        """In-flight load over the limits of the model's healthy engines, 0..1 (or more)."""
        used = cap = 0.0
        for s in self.snapshots(model):
            lim, load = self.limits.get(s.id), self.load.get(s.id)
            if lim is None or load is None:
                continue
            share = load.running / lim.max_running
            if lim.max_tokens:
                share = max(share, load.tokens / lim.max_tokens)
            used += share
            cap += 1.0
        return used / cap if cap else 1.0

    def overloaded(self, model: str) -> bool:
        """Requests waiting, or the engines' in-flight load at `overload_at` of their limits:
        OIT may throttle. Below 1, it throttles before the queue forms, keeping headroom for
        tenants within their limits."""
        return bool(self.policy(model).waiting()) or self.utilisation(model) >= self.overload_at

    def submit(self, t: Ticket, model: str, now: float) -> tuple[Decision, str]:
        """A request arrives. START comes with its engine, already reserved."""
        policy = self.policy(model)
        healthy = self.snapshots(model)
        if not healthy:
            return Decision.UNAVAILABLE, ""
        if not policy.waiting() and policy.may_start(t.tenant, now):
            engines = self.open_engines(model, t, healthy)
            if engines:
                return Decision.START, self._start(t, model, engines, now)
        if policy.backlog(t.tenant) >= self.max_queue:
            return Decision.FULL, ""
        policy.enqueue(t, now)
        return Decision.QUEUED, ""

    def _start(self, t: Ticket, model: str, engines: list[EngineSnapshot], now: float) -> str:
        engine = self.route(t, engines)
        load = self.load[engine]
        load.running += 1
        load.tokens += t.prompt_tokens + t.expected_output
        self.engine_of[t.rid] = engine
        self.policy(model).charge_admission(t, now)
        return engine

    def cancel(self, t: Ticket, model: str) -> bool:
        """A waiting request leaves (client gone, timed out); True if it was waiting."""
        return self.policy(model).remove(t)

    def on_tokens(self, t: Ticket, model: str, n: int) -> None:
        self.policy(model).on_tokens(t, n)

    def finish(
        self, t: Ticket, model: str, prompt_tokens: int, output_tokens: int, now: float
    ) -> list[tuple[Ticket, str]]:
        """A started request ended; returns the waiting requests that start in its place."""
        engine = self.engine_of.pop(t.rid, None)
        if engine is not None:
            load = self.load[engine]
            load.running -= 1
            load.tokens -= t.prompt_tokens + t.expected_output
        self.policy(model).on_finish(t, prompt_tokens, output_tokens)
        return self.poll(model, now)

    def poll(self, model: str, now: float) -> list[tuple[Ticket, str]]:
        """Start waiting requests while engines have room (after a finish, a re-admitted
        engine, or a rate-limit window that opened)."""
        policy = self.policy(model)
        started: list[tuple[Ticket, str]] = []
        while policy.waiting():
            t = policy.pop_next(now)
            if t is None:
                break
            engines = self.open_engines(model, t)
            if not engines:
                # The pick does not fit anywhere yet: it keeps its turn (no skipping ahead).
                policy.enqueue_front(t)
                break
            started.append((t, self._start(t, model, engines, now)))
        return started


def build_dispatcher(cfg: Config, snapshots: Snapshots, route: Route) -> Dispatcher:
    """The dispatcher `cfg` describes; the gateway and the simulator build it the same way."""
    f = cfg.fairness
    prices = Prices(f.input_price, f.output_price)

    def rpm(tenant: str) -> int:
        t = cfg.tenants.get(tenant)
        return t.rpm if t is not None and t.rpm else f.rpm_limit

    def policy(model: str) -> FairnessPolicy:
        return make_policy(f.policy, prices, rpm)

    limits = {e.id: EngineLimit(e.max_running, e.max_kv_tokens) for e in cfg.engines}
    return Dispatcher(policy, limits, snapshots, route, f.max_queue_per_tenant, f.overload_at)
