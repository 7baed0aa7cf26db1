"""What every fairness policy is built on: the `Ticket` a waiting request is, the `Prices` of
service, the `FairnessPolicy` protocol the gateway's queue and the cluster simulator drive, and
`Queued`, the per-tenant FIFO lanes the policies of gateway.core.fairness share. Pure and
synchronous.
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


class Queued:
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
