"""Fairness policies: who goes next when every engine of a model is saturated.

Pure and synchronous. The gateway's queue and the cluster simulator drive the same objects:
`enqueue` when a request must wait, `pop_next` when a slot frees, `charge_admission` when any
request (queued or not) leaves for an engine, `on_tokens` as its output streams, `on_finish`
with the real usage. Counters are in service units: `input_price` per prompt token plus
`output_price` per output token (VTC's prices: 1 and 2).

- `fcfs`: arrival order.
- `rpm`: arrival order, but a tenant may start at most `rpm_limit` requests per minute.
- `vtc`: Virtual Token Counter (Sheng et al., OSDI'24): the backlogged tenant with the least
  weighted service goes first; a tenant that becomes backlogged is lifted to the smallest
  counter of the backlogged tenants, so idling earns no credit.
- `wsc`: FairServe's weighted service counter: VTC's rule on costs normalised by the expected
  cost of the request's application (a typical request costs one unit whatever its shape), and
  requests that continue an interaction in progress go before all others.

Several gateway replicas share one fairness (`gateway.state.cluster`): their VTC and WSC
counters are summed in Redis and written back into `served`, and `remote` names the tenants
waiting for the model at other replicas. A tenant more than `hold_slack`
typical requests ahead of one of them does not start here: the engines' freed capacity goes to
the replica where the less served tenant waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.core.fair_queue import FairnessPolicy, Prices, Queued, Ticket

_VTC_PRICES = Prices()  # frozen: one default serves every policy


class Fcfs(Queued):
    name = "fcfs"


class RpmLimit(Queued):
    """First come first served under a per-tenant cap on requests started per minute. Not
    work-conserving: capacity idles while only capped tenants wait."""

    name = "rpm"
    window_s = 60.0

    def __init__(self, limit: Callable[[str], int], prices: Prices = _VTC_PRICES) -> None:
        super().__init__(prices)
        self.limit = limit
        self.starts: dict[str, deque[float]] = {}

    def _recent(self, tenant: str, now: float) -> deque[float]:
        d = self.starts.setdefault(tenant, deque())
        while d and d[0] <= now - self.window_s:
            d.popleft()
        return d

    def _eligible(self, now: float) -> Callable[[str], bool]:
        return lambda tenant: self.may_start(tenant, now)

    def may_start(self, tenant: str, now: float) -> bool:
        return len(self._recent(tenant, now)) < self.limit(tenant)

    def charge_admission(self, t: Ticket, now: float) -> None:
        super().charge_admission(t, now)
        self._recent(t.tenant, now).append(now)

    def wake_at(self, now: float) -> float | None:
        times = [
            self._recent(tenant, now)[0] + self.window_s
            for tenant, q in self.queues.items()
            if q and len(self._recent(tenant, now)) >= self.limit(tenant)
        ]
        return min(times) if times else None

    def counters(self) -> dict[str, float]:
        return {tenant: float(len(d)) for tenant, d in self.starts.items()}


class Vtc(Queued):
    """Virtual token counters, weighted: service is divided by the tenant's weight."""

    name = "vtc"
    hold_slack = 2.0  # typical requests a tenant may be ahead of one waiting elsewhere
    lead_cap = 16.0  # typical requests; see `rebase`

    def __init__(self, prices: Prices = _VTC_PRICES) -> None:
        super().__init__(prices)
        self.served: dict[str, float] = {}
        # Tenants waiting for this model at other replicas (shared state).
        self.remote: frozenset[str] = frozenset()
        self._typical: dict[str, float] = {}  # one typical request of the tenant, in counter units
        self._marks: dict[str, tuple[str, float]] = {}

    def _scale(self, t: Ticket) -> float:
        return 1.0 / t.weight

    def _becomes_backlogged(self, tenant: str) -> None:
        others = [self.served.get(k, 0.0) for k, q in self.queues.items() if q and k != tenant]
        others += [self.served.get(k, 0.0) for k in self.remote if k != tenant]
        if others:
            self._lift(tenant, min(others))

    def _lift(self, tenant: str, to: float) -> None:
        """Raise the tenant's counter to `to` (idling earns no credit)."""
        if to > self.served.get(tenant, 0.0):
            self.served[tenant] = to
            self._marks[tenant] = ("max", to)

    def rebase(self) -> None:
        """Bring a tenant waiting here back to `lead_cap` typical requests ahead of the least
        served tenant waiting anywhere: a lead that large was earned while nobody contended
        (using idle capacity is not to be paid for later), or by two replicas lifting at once
        without seeing each other. Called after each exchange with the other replicas."""
        here = self.backlogged()
        if not self.remote or not here:
            return
        low = min(self.served.get(k, 0.0) for k in {*here, *self.remote})
        for tenant in here:
            cap = low + self.lead_cap * self._typical.get(tenant, 1.0)
            if self.served.get(tenant, 0.0) > cap:
                self.served[tenant] = cap
                self._marks[tenant] = ("min", cap)

    def take_marks(self) -> dict[str, tuple[str, float]]:
        """The counters set outright (lifted or rebased) since the last call: tenant ->
        ("max" or "min", the value set). Shared counters apply them as a maximum or a minimum,
        which two replicas setting one tenant at once must not add up."""
        marks, self._marks = self._marks, {}
        return marks

    def enqueue(self, t: Ticket, now: float) -> None:
        self._typical[t.tenant] = t.unit_cost * self._scale(t)
        super().enqueue(t, now)

    def _key(self, tenant: str, head: Ticket) -> Any:
        return (self.served.get(tenant, 0.0), head.seq)

    def may_start(self, tenant: str, now: float) -> bool:
        """Not while the tenant is `hold_slack` typical requests ahead of a tenant waiting
        at another replica."""
        behind = [self.served.get(k, 0.0) for k in self.remote if k != tenant]
        if not behind:
            return True
        slack = self.hold_slack * self._typical.get(tenant, 1.0)
        return self.served.get(tenant, 0.0) <= min(behind) + slack

    def _eligible(self, now: float) -> Callable[[str], bool]:
        if not self.remote:
            return super()._eligible(now)
        return lambda tenant: self.may_start(tenant, now)

    def charge_admission(self, t: Ticket, now: float) -> None:
        super().charge_admission(t, now)
        self._typical[t.tenant] = t.unit_cost * self._scale(t)
        self._add(t, self.prices.input * t.prompt_tokens)

    def on_tokens(self, t: Ticket, n: int) -> None:
        self._add(t, self.prices.output * n)

    def on_finish(self, t: Ticket, prompt_tokens: int, output_tokens: int) -> None:
        # The prompt was charged from the gateway's estimate; settle with the engine's count.
        if prompt_tokens and prompt_tokens != t.charged_prompt:
            self._add(t, self.prices.input * (prompt_tokens - t.charged_prompt))
            t.charged_prompt = prompt_tokens

    def _add(self, t: Ticket, service: float) -> None:
        self.served[t.tenant] = self.served.get(t.tenant, 0.0) + service * self._scale(t)

    def counters(self) -> dict[str, float]:
        return dict(self.served)


class Wsc(Vtc):
    """FairServe's weighted service counter.

    Two rules differ from VTC. Only a newly *active* tenant (nothing waiting and nothing in
    flight) is lifted to the smallest counter of the active tenants: a tenant that keeps
    requests running below its share keeps its lower counter when it has to queue, instead of
    being lifted level with a flooding tenant. And a call that continues an interaction goes
    first, unless its tenant is more than `lead` typical requests ahead of the least served
    waiting tenant, so an agent is not stalled halfway but cannot ride interactions past its
    share."""

    name = "wsc"
    lanes = True
    lead = 1.0  # in units of one typical request of the application

    def __init__(self, prices: Prices = _VTC_PRICES) -> None:
        super().__init__(prices)
        self.in_flight: dict[str, int] = {}
        self._floor = 0.0

    def _scale(self, t: Ticket) -> float:
        return 1.0 / (t.weight * t.unit_cost)

    def _becomes_backlogged(self, tenant: str) -> None:
        if self.in_flight.get(tenant, 0):
            return
        active = [
            self.served.get(k, 0.0)
            for k in {*(k for k, q in self.queues.items() if q), *self.in_flight}
            if k != tenant
        ]
        active += [self.served.get(k, 0.0) for k in self.remote if k != tenant]
        if active:
            self._lift(tenant, min(active))

    def charge_admission(self, t: Ticket, now: float) -> None:
        super().charge_admission(t, now)
        self.in_flight[t.tenant] = self.in_flight.get(t.tenant, 0) + 1

    def on_finish(self, t: Ticket, prompt_tokens: int, output_tokens: int) -> None:
        super().on_finish(t, prompt_tokens, output_tokens)
        left = self.in_flight.get(t.tenant, 0) - 1
        if left > 0:
            self.in_flight[t.tenant] = left
        else:
            self.in_flight.pop(t.tenant, None)

    def pop_next(self, now: float) -> Ticket | None:
        backlogged = [self.served.get(k, 0.0) for k, q in self.queues.items() if q]
        self._floor = min(backlogged, default=0.0) + self.lead
        return super().pop_next(now)

    def _key(self, tenant: str, head: Ticket) -> Any:
        counter = self.served.get(tenant, 0.0)
        first = head.continuing and counter <= self._floor
        return (not first, counter, head.seq)


# (prices, the per-tenant limit of policy "rpm") -> a policy.
PolicyFactory = Callable[[Prices, Callable[[str], int]], FairnessPolicy]

# Every policy `[fairness] policy` may name. Config validation and `make_policy` both read this
# table, so that a new policy is one entry here.
POLICIES: dict[str, PolicyFactory] = {
    "fcfs": lambda prices, rpm_limit: Fcfs(prices),
    "rpm": lambda prices, rpm_limit: RpmLimit(rpm_limit, prices),
    "vtc": lambda prices, rpm_limit: Vtc(prices),
    "wsc": lambda prices, rpm_limit: Wsc(prices),
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def make_policy(name: str, prices: Prices, rpm_limit: Callable[[str], int]) -> FairnessPolicy:
    """The policy registered as `name`; `rpm_limit(tenant)` is what policy "rpm" allows."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown fairness policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factory(prices, rpm_limit)
