"""The batch feed: delay-tolerant requests wait in a queue of their own and start only where a
region has room (SageServe's asynchronous feed, arXiv 2502.14617).

A batch request (class `batch`) does not enter its model's fairness queue. It waits in the
model's `BatchQueue`, earliest deadline first, and starts on an engine of the least utilised
region while that region's in-flight load is below `batch.feed_below` of its engines' limits:
the headroom above it is the interactive requests', which batch work never holds back (a freed
slot goes to the fairness queue first). A request whose deadline is near, its slack (the time
left less its expected service time) under that service time, starts wherever an engine has
room, whatever the utilisation; one whose deadline passes while it waits is taken out by
`expire`, for the shell to answer with an error. Once started it is charged, routed and settled
like any other request.

Pure and synchronous, like the dispatcher it starts requests through.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config.schema import Config
from gateway.core.dispatch import Decision, Dispatcher
from gateway.core.fair_queue import Ticket

# Seconds per output token a request is expected to take before any request of its model has
# ended: a sequence's pace on a busy engine (about 20 tokens a second). Measured ends replace it.
PRIOR_S_PER_TOKEN = 0.05
# Weight of each ended request in the running estimate of seconds per output token.
EWMA = 0.1


@dataclass(slots=True, eq=False)
class Waiting:
    """A batch request in its queue."""

    ticket: Ticket
    deadline: float
    service_s: float  # expected service time, as estimated when it arrived
    seq: int  # arrival order: equal deadlines go first come, first served
    urgent: bool = False
    live: bool = True

    @property
    def key(self) -> tuple[float, int]:
        return self.deadline, self.seq

    @property
    def urgent_at(self) -> float:
        """From when its slack (time left less service time) is under its service time."""
        return self.deadline - 2.0 * self.service_s


def _key(w: Waiting) -> tuple[float, int]:
    return w.key


class BatchQueue:
    """One model's waiting batch requests, earliest deadline first; those whose deadline has
    come near also in `urgent`, in the same order."""

    def __init__(self) -> None:
        self.order: list[Waiting] = []
        self.urgent: list[Waiting] = []
        self._urgency: list[tuple[float, int, Waiting]] = []  # heap: when each becomes urgent
        self._by_handle: dict[int, Waiting] = {}
        self._backlog: dict[str, int] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.order)

    def backlog(self, tenant: str) -> int:
        return self._backlog.get(tenant, 0)

    def find(self, handle: int) -> Waiting | None:
        return self._by_handle.get(handle)

    def push(self, t: Ticket, deadline: float, service_s: float) -> Waiting:
        w = Waiting(t, deadline, service_s, next(self._seq))
        bisect.insort(self.order, w, key=_key)
        heapq.heappush(self._urgency, (w.urgent_at, w.seq, w))
        self._by_handle[t.handle] = w
        self._backlog[t.tenant] = self.backlog(t.tenant) + 1
        return w

    def take(self, w: Waiting) -> None:
        """`w` leaves the queue: started, expired or cancelled."""
        w.live = False
        _remove(self.order, w)
        if w.urgent:
            _remove(self.urgent, w)
        del self._by_handle[w.ticket.handle]
        left = self._backlog[w.ticket.tenant] - 1
        if left:
            self._backlog[w.ticket.tenant] = left
        else:
            del self._backlog[w.ticket.tenant]
        if len(self._urgency) > 2 * len(self.order) + 64:
            # Left entries stay in the heap until their time comes: a day, by default.
            self._urgency = [e for e in self._urgency if e[2].live]
            heapq.heapify(self._urgency)

    def expired(self, now: float) -> list[Waiting]:
        """Take out every request whose deadline is `now` or past."""
        out = []
        while self.order and self.order[0].deadline <= now:
            out.append(w := self.order[0])
            self.take(w)
        return out

    def heat(self, now: float) -> None:
        """Those whose deadline has come near by `now` join `urgent`."""
        h = self._urgency
        while h and h[0][0] <= now:
            w = heapq.heappop(h)[2]
            if w.live:
                w.urgent = True
                bisect.insort(self.urgent, w, key=_key)

    def next_event(self) -> float | None:
        """When the next request becomes urgent or expires, whichever comes first."""
        h = self._urgency
        while h and not h[0][2].live:
            heapq.heappop(h)
        times = [h[0][0]] if h else []
        if self.order:
            times.append(self.order[0].deadline)
        return min(times) if times else None


def _remove(items: list[Waiting], w: Waiting) -> None:
    del items[bisect.bisect_left(items, w.key, key=_key)]  # keys are unique


class BatchFeed:
    """Every model's batch queue, fed through `dispatcher` (see the module docstring).

    The expected service time of a request is its expected output tokens times the recent
    seconds per output token of its model's requests, from start to end on their engine."""

    def __init__(self, cfg: Callable[[], Config], dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.queues: dict[str, BatchQueue] = {}
        self._s_per_token: dict[str, float] = {}

    def queue(self, model: str) -> BatchQueue:
        q = self.queues.get(model)
        if q is None:
            q = self.queues[model] = BatchQueue()
        return q

    def waiting(self) -> dict[str, int]:
        """Batch requests waiting, per model."""
        return {model: len(q) for model, q in self.queues.items()}

    def service_s(self, model: str, t: Ticket) -> float:
        return self._s_per_token.get(model, PRIOR_S_PER_TOKEN) * max(1, t.expected_output)

    def observe(self, model: str, seconds: float, output_tokens: int) -> None:
        """A request of `model` ended `seconds` after it started on its engine."""
        if seconds <= 0 or output_tokens <= 0:
            return
        per_token = seconds / output_tokens
        old = self._s_per_token.get(model)
        self._s_per_token[model] = per_token if old is None else old + EWMA * (per_token - old)

    def submit(self, t: Ticket, model: str, deadline: float, now: float) -> tuple[Decision, str]:
        """A batch request arrives: START on an engine of a region with room (when none
        waits before it, or its deadline is near already), or QUEUED; FULL and UNAVAILABLE
        as the dispatcher's."""
        d = self.dispatcher
        if not d.snapshots(model):
            return Decision.UNAVAILABLE, ""
        q = self.queue(model)
        service = self.service_s(model, t)
        urgent = deadline - 2.0 * service <= now
        # Those waiting wait for want of room: a newcomer finds none either, unless urgent.
        if (urgent or not q) and d.policy(model).may_start(t.tenant, now):
            engine = self._place(t, model, now, urgent)
            if engine is not None:
                return Decision.START, engine
        if q.backlog(t.tenant) >= d.max_queue:
            return Decision.FULL, ""
        q.push(t, deadline, service)
        return Decision.QUEUED, ""

    def feed(self, model: str, now: float) -> list[tuple[Ticket, str]]:
        """Start waiting requests: those whose deadline is near wherever an engine has room,
        then the others while a region is below `batch.feed_below`; earliest deadline first,
        each pass stopping at the first that finds no place."""
        q = self.queues.get(model)
        if not q:
            return []
        q.heat(now)
        policy = self.dispatcher.policy(model)
        started: list[tuple[Ticket, str]] = []
        for items in (q.urgent, q.order):
            i = 0
            while i < len(items):
                w = items[i]
                if not policy.may_start(w.ticket.tenant, now):
                    i += 1  # its tenant may not start yet (rate limits): the next may
                    continue
                engine = self._place(w.ticket, model, now, w.urgent)
                if engine is None:
                    break
                q.take(w)  # out of `items` too: the next one is at `i` now
                started.append((w.ticket, engine))
        return started

    def _place(self, t: Ticket, model: str, now: float, urgent: bool) -> str | None:
        """Start `t` in the least utilised region with room for it (below `feed_below`
        unless `urgent`); None when there is none."""
        d = self.dispatcher
        engines = d.snapshots(model)
        util = d.utilisation_by_region(engines)
        below = self.cfg().batch.feed_below
        for region in sorted(util, key=util.__getitem__):
            if not urgent and util[region] >= below:
                break
            room = d.open_engines(t, [s for s in engines if s.region == region])
            if room:
                return d.start(t, model, room, now)
        return None

    def expire(self, model: str, now: float) -> list[Ticket]:
        """Take out the waiting requests whose deadline has passed."""
        q = self.queues.get(model)
        return [w.ticket for w in q.expired(now)] if q else []

    def cancel(self, t: Ticket, model: str) -> bool:
        """A waiting request leaves (client gone, shutdown); True if it was waiting here."""
        q = self.queues.get(model)
        w = q.find(t.handle) if q is not None else None
        if w is None or q is None:
            return False
        q.take(w)
        return True

    def wake_at(self, model: str) -> float | None:
        """When a waiting request becomes urgent or expires with no other event."""
        q = self.queues.get(model)
        return q.next_event() if q else None
