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

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True, eq=False)
class Ticket:
    """A request as the fairness policy sees it."""

    rid: str
    tenant: str
    app: str
    prompt_tokens: int
    expected_output: int
    arrival: float
    weight: float = 1.0  # the tenant's
    unit_cost: float = 1.0  # the application's expected cost, in service units (WSC)
    continuing: bool = False  # continues an interaction already in progress
    payload: Any = None  # the caller's handle: a future in the gateway, a job in the simulator
    seq: int = 0  # arrival order, set by the policy
    charged_prompt: int = 0  # prompt tokens charged at admission, settled at the end
    handle: int = 0  # the gate core's key for the request in the ledger
    predicted_output: int = 0  # the length predictor's median (0: none), for the router


@dataclass(frozen=True, slots=True)
class Prices:
    input: float = 1.0
    output: float = 2.0


class FairnessPolicy(Protocol):
    name: str

    def enqueue(self, t: Ticket, now: float) -> None: ...

    def pop_next(self, now: float) -> Ticket | None: ...

    def enqueue_front(self, t: Ticket) -> None: ...

    def remove(self, t: Ticket) -> bool:
        """Take a waiting ticket out (its client left or it timed out)."""
        ...

    def charge_admission(self, t: Ticket, now: float) -> None: ...

    def on_tokens(self, t: Ticket, n: int) -> None: ...

    def on_finish(self, t: Ticket, prompt_tokens: int, output_tokens: int) -> None: ...

    def may_start(self, tenant: str, now: float) -> bool:
        """Whether a request of `tenant` may start now at all (rate-limit policies, or a
        tenant ahead of those waiting at other replicas)."""
        ...

    def wake_at(self, now: float) -> float | None:
        """When a waiting ticket may become eligible with no other event (rate limits)."""
        ...

    def waiting(self) -> int: ...

    def backlog(self, tenant: str) -> int: ...

    def counters(self) -> dict[str, float]: ...

    def backlogged(self) -> list[str]:
        """The tenants with requests waiting here."""
        ...


@dataclass(slots=True)
class _Lanes:
    """One tenant's waiting tickets: continuing interactions first, each lane in FIFO order."""

    cont: deque[Ticket] = field(default_factory=deque)
    fresh: deque[Ticket] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.cont) + len(self.fresh)

    def head(self, lanes: bool) -> Ticket:
        if lanes and self.cont:
            return self.cont[0]
        if not self.fresh:
            return self.cont[0]
        if not self.cont:
            return self.fresh[0]
        return self.cont[0] if self.cont[0].seq < self.fresh[0].seq else self.fresh[0]

    def take(self, t: Ticket) -> None:
        (self.cont if self.cont and self.cont[0] is t else self.fresh).popleft()


class _Queued:
    """Per-tenant FIFO lanes shared by every policy; subclasses pick the tenant."""

    name = ""
    lanes = False  # whether continuing interactions form their own, first, lane

    def __init__(self, prices: Prices = Prices()) -> None:
        self.prices = prices
        self.queues: dict[str, _Lanes] = {}
        self._n = 0
        self._seq = itertools.count()

    def enqueue(self, t: Ticket, now: float) -> None:
        t.seq = next(self._seq)
        q = self.queues.get(t.tenant)
        if q is None or not q:
            self._becomes_backlogged(t.tenant)
            q = self.queues.setdefault(t.tenant, _Lanes())
        (q.cont if self.lanes and t.continuing else q.fresh).append(t)
        self._n += 1

    def enqueue_front(self, t: Ticket) -> None:
        """Put a just-popped ticket back at the head of its lane; it keeps its turn."""
        q = self.queues.setdefault(t.tenant, _Lanes())
        (q.cont if self.lanes and t.continuing else q.fresh).appendleft(t)
        self._n += 1

    def _becomes_backlogged(self, tenant: str) -> None:
        pass

    def remove(self, t: Ticket) -> bool:
        q = self.queues.get(t.tenant)
        if q is None:
            return False
        for lane in (q.cont, q.fresh):
            if t in lane:
                lane.remove(t)
                self._n -= 1
                return True
        return False

    def _pick(self, key: Callable[[str, Ticket], Any], eligible: Callable[[str], bool]) -> Ticket:
        best: tuple[Any, Ticket] | None = None
        for tenant, q in self.queues.items():
            if q and eligible(tenant):
                head = q.head(self.lanes)
                k = key(tenant, head)
                if best is None or k < best[0]:
                    best = (k, head)
        if best is None:
            raise LookupError("no eligible ticket")
        return best[1]

    def _take(self, t: Ticket) -> Ticket:
        self.queues[t.tenant].take(t)
        self._n -= 1
        return t

    def pop_next(self, now: float) -> Ticket | None:
        if not self._n:
            return None
        try:
            return self._take(self._pick(self._key, self._eligible(now)))
        except LookupError:
            return None

    def _key(self, tenant: str, head: Ticket) -> Any:
        return head.seq

    def _eligible(self, now: float) -> Callable[[str], bool]:
        return lambda tenant: True

    def charge_admission(self, t: Ticket, now: float) -> None:
        t.charged_prompt = t.prompt_tokens

    def on_tokens(self, t: Ticket, n: int) -> None:
        pass

    def on_finish(self, t: Ticket, prompt_tokens: int, output_tokens: int) -> None:
        pass

    def may_start(self, tenant: str, now: float) -> bool:
        return True

    def wake_at(self, now: float) -> float | None:
        return None

    def waiting(self) -> int:
        return self._n

    def backlog(self, tenant: str) -> int:
        q = self.queues.get(tenant)
        return len(q) if q else 0

    def counters(self) -> dict[str, float]:
        return {}

    def backlogged(self) -> list[str]:
        return [tenant for tenant, q in self.queues.items() if q]

    def tickets(self) -> Iterator[Ticket]:
        for q in self.queues.values():
            yield from q.cont
            yield from q.fresh


class Fcfs(_Queued):
    name = "fcfs"


class RpmLimit(_Queued):
    """First come first served under a per-tenant cap on requests started per minute. Not
    work-conserving: capacity idles while only capped tenants wait."""

    name = "rpm"
    window_s = 60.0

    def __init__(self, limit: Callable[[str], int], prices: Prices = Prices()) -> None:
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


class Vtc(_Queued):
    """Virtual token counters, weighted: service is divided by the tenant's weight."""

    name = "vtc"
    hold_slack = 2.0  # typical requests a tenant may be ahead of one waiting elsewhere
    lead_cap = 16.0  # typical requests; see `rebase`

    def __init__(self, prices: Prices = Prices()) -> None:
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

    def __init__(self, prices: Prices = Prices()) -> None:
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
