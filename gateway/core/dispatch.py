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

from collections.abc import Callable, Iterable
from enum import Enum

from gateway.config.schema import Config
from gateway.core.fair_queue import FairnessPolicy, Prices, Ticket
from gateway.core.fairness import make_policy
from gateway.core.ledger import EngineSnapshot, Ledger


class Decision(Enum):
    START = "start"  # an engine has room: `ticket_engine` says which
    QUEUED = "queued"
    FULL = "full"  # the tenant's queue is at its limit
    UNAVAILABLE = "unavailable"  # no healthy engine serves the model: waiting would not help


Route = Callable[[Ticket, list[EngineSnapshot]], str]
Snapshots = Callable[[str], list[EngineSnapshot]]
Routable = Callable[[str], Iterable[str]]


class Dispatcher:
    """Fairness queues per model over the ledger's count of engine load.

    `snapshots(model)` gives the engines that may take new requests, with the ledger's load;
    it is called once per decision, and the router sees that same list. `routable(model)`
    names the same engines without building snapshots (for OIT's utilisation check)."""

    def __init__(
        self,
        policy: Callable[[str], FairnessPolicy],
        ledger: Ledger,
        snapshots: Snapshots,
        route: Route,
        max_queue_per_tenant: int,
        overload_at: float = 1.0,
        routable: Routable | None = None,
    ) -> None:
        self._new_policy = policy
        self.routable: Routable = routable or (lambda m: [s.id for s in snapshots(m)])
        self.ledger = ledger
        self.snapshots = snapshots
        self.route = route
        self.max_queue = max_queue_per_tenant
        self.overload_at = overload_at
        self.policies: dict[str, FairnessPolicy] = {}

    def policy(self, model: str) -> FairnessPolicy:
        p = self.policies.get(model)
        if p is None:
            p = self.policies[model] = self._new_policy(model)
        return p

    def open_engines(self, t: Ticket, engines: list[EngineSnapshot]) -> list[EngineSnapshot]:
        """Those of `engines` with room for `t`."""
        loads, cost = self.ledger.loads, t.prompt_tokens + t.expected_output
        return [s for s in engines if (load := loads.get(s.id)) is not None and load.has_room(cost)]

    def utilisation(self, model: str) -> float:
        """In-flight load over the limits of the model's routable engines, 0..1 (or more)."""
        used = cap = 0.0
        for engine in self.routable(model):
            load = self.ledger.loads.get(engine)
            if load is not None:
                used += load.share()
                cap += 1.0
        return used / cap if cap else 1.0

    def utilisation_by_region(self, engines: list[EngineSnapshot]) -> dict[str, float]:
        """`utilisation` of each region of `engines` (one model's snapshots)."""
        used: dict[str, float] = {}
        cap: dict[str, float] = {}
        for s in engines:
            load = self.ledger.loads.get(s.id)
            if load is not None:
                used[s.region] = used.get(s.region, 0.0) + load.share()
                cap[s.region] = cap.get(s.region, 0.0) + 1.0
        return {region: used[region] / n for region, n in cap.items()}

    def overloaded(self, model: str) -> bool:
        """Requests waiting, or the engines' in-flight load at `overload_at` of their limits:
        OIT may throttle. Below 1, it throttles before the queue forms, keeping headroom for
        tenants within their limits."""
        return bool(self.policy(model).waiting()) or self.utilisation(model) >= self.overload_at

    def submit(self, t: Ticket, model: str, now: float) -> tuple[Decision, str]:
        """A request arrives. START comes with its engine, already charged in the ledger."""
        policy = self.policy(model)
        healthy = self.snapshots(model)
        if not healthy:
            return Decision.UNAVAILABLE, ""
        if not policy.waiting() and policy.may_start(t.tenant, now):
            engines = self.open_engines(t, healthy)
            if engines:
                return Decision.START, self.start(t, model, engines, now)
        if policy.backlog(t.tenant) >= self.max_queue:
            return Decision.FULL, ""
        policy.enqueue(t, now)
        return Decision.QUEUED, ""

    def start(self, t: Ticket, model: str, engines: list[EngineSnapshot], now: float) -> str:
        """Send `t` to the router's pick of `engines` (each with room for it): charged in the
        ledger and to its tenant's fairness counter."""
        engine = self.route(t, engines)
        self.ledger.charge(t.handle, engine, prompt_tokens=t.prompt_tokens,
                           decode_tokens=t.predicted_output,
                           kv_tokens=t.prompt_tokens + t.expected_output, now=now)  # fmt: skip
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
        self.ledger.release(t.handle)
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
            engines = self.open_engines(t, self.snapshots(model))
            if not engines:
                # The pick does not fit anywhere yet: it keeps its turn (no skipping ahead).
                policy.enqueue_front(t)
                break
            started.append((t, self.start(t, model, engines, now)))
        return started


def build_dispatcher(
    cfg: Callable[[], Config],
    ledger: Ledger,
    snapshots: Snapshots,
    route: Route,
    routable: Routable | None = None,
) -> Dispatcher:
    """The dispatcher the config `cfg()` describes (read again at each use, so a reload
    applies); the gateway and the simulator build it the same way."""
    f = cfg().fairness
    prices = Prices(f.input_price, f.output_price)

    def rpm(tenant: str) -> int:
        c = cfg()
        t = c.tenants.get(tenant)
        return t.rpm if t is not None and t.rpm else c.fairness.rpm_limit

    def policy(model: str) -> FairnessPolicy:
        return make_policy(f.policy, prices, rpm)

    return Dispatcher(policy, ledger, snapshots, route, f.max_queue_per_tenant, f.overload_at,
                      routable)  # fmt: skip
