"""The gate core: admission, the fairness queue, routing and the ledger, in one synchronous object.

Both the gateway's asyncio shell (`gateway.http.gate`) and the cluster simulator's frontend
(`gateway.simulate`) drive this very object, so a policy measured in the simulator is the
policy the gateway runs. Each admitted request gets a `Slot` keyed by a gateway-internal
handle; its charge in the ledger follows it from admission to its end, through retries on other
engines. The engines come from a `Fleet`: the gateway's registry, or the simulator's engines.

Batch requests wait in a queue of their own (`gateway.core.batch`) and start where a region
has room; one whose deadline passes while it waits is taken out by `expire`.

Token buckets are not here: the gateway keeps them behind an async store (memory or Redis) and
the simulator in memory; the core says what to charge (`Admitting`) and the shells charge it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config.batch import DAY_S
from gateway.config.schema import Config
from gateway.core.admission import Admission, Admitting, Keyed
from gateway.core.batch import BatchFeed
from gateway.core.demand import Demand
from gateway.core.dispatch import Decision, build_dispatcher
from gateway.core.fair_queue import Ticket
from gateway.core.ledger import EngineLimit, EngineSnapshot, Ledger
from gateway.core.request import RequestInfo


class EngineView(Protocol):
    """What the core reads of an engine: who it is, whether it takes new requests, and the
    gauges last scraped from it."""

    @property
    def id(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def routable(self) -> bool: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def kv_usage(self) -> float: ...
    @property
    def in_flight_at_scrape(self) -> int: ...  # the ledger's in-flight count at the scrape


class Fleet(Protocol):
    def engines_of(self, model: str) -> Sequence[EngineView]: ...


class Router(Protocol):
    """`gateway.routing`'s policies: one of `engines` (never empty) for `request`."""

    @property
    def name(self) -> str: ...

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str: ...


@dataclass(slots=True, eq=False)
class Slot:
    """One admitted request, from admission to its end: where it is charged and what to
    settle. `handle` is the ledger's key for it; `payload` is the shell's (a future in the
    gateway, a job in the simulator)."""

    handle: int
    info: RequestInfo
    ticket: Ticket
    keys: Keyed
    cost: float  # charged to the buckets at admission
    engine: str = ""  # where its charge is now ("" while it waits)
    charged_output: int = 0  # output tokens charged to the fairness counters so far
    started: float | None = None  # when it left for an engine (the core's clock)
    done: bool = False
    payload: Any = None


class GateCore:
    """Admission (OIT), the fairness queues, the router and the ledger over one fleet."""

    def __init__(self, cfg: Config, fleet: Fleet, router: Router) -> None:
        self.cfg = cfg
        self.fleet = fleet
        self.router = router
        self.ledger = Ledger()
        for e in cfg.engines:
            self.set_limit(e.id, EngineLimit(max_running=e.max_running,
                                             max_tokens=e.max_kv_tokens))  # fmt: skip
        self.dispatcher = build_dispatcher(lambda: self.cfg, self.ledger, self.snapshots,
                                           self._route, self.routable)  # fmt: skip
        self.admission = Admission(cfg, self.dispatcher)
        self.batch = BatchFeed(lambda: self.cfg, self.dispatcher)
        self._handles = itertools.count(1)
        self.slots: dict[int, Slot] = {}  # admitted, not yet finished: waiting or in flight
        # Called with an engine id each time a request there ends (draining engines go then).
        self.on_release: Callable[[str], None] | None = None
        # Requests and tokens per minute per (model, region, class), by the wall clock (the
        # simulator's own); `on_demand` sees each count too (the replicas' shared demand).
        self.demand = Demand()
        self.clock: Callable[[], float] = time.time
        self.on_demand: Callable[[tuple[str, str, str], int, int, int], None] | None = None

    # The fleet ---------------------------------------------------------------------------

    def set_limit(self, engine: str, limit: EngineLimit) -> None:
        """An engine joins the ledger, or its limits change."""
        self.ledger.add_engine(engine, limit)

    def drop_engine(self, engine: str) -> None:
        """The engine has left the fleet: its ledger entry goes (charges still there are the
        shells' to end; they are released now so nothing stays counted)."""
        self.ledger.remove_engine(engine)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: tenants, weights, rates, applications and queue bounds apply to
        the next decisions; counters, buckets and queues are kept."""
        self.cfg = cfg
        self.admission.cfg = cfg
        self.dispatcher.max_queue = cfg.fairness.max_queue_per_tenant
        self.dispatcher.overload_at = cfg.fairness.overload_at
        self.admission.interactions.ttl_s = cfg.fairness.interaction_ttl_s
        self.admission.interactions.lifetime_s = cfg.fairness.interaction_lifetime_s

    def snapshots(self, model: str, exclude: Iterable[str] = ()) -> list[EngineSnapshot]:
        """The engines of `model` that take new requests, less `exclude`, each with its
        scraped gauges and the ledger's load: one list per routing decision."""
        loads = self.ledger.loads
        out = []
        for e in self.fleet.engines_of(model):
            load = loads.get(e.id)
            if load is None or not e.routable or e.id in exclude:
                continue
            out.append(EngineSnapshot(
                id=e.id, region=e.region, model=e.model, healthy=True, running=e.running,
                waiting=e.waiting, kv_usage=e.kv_usage, in_flight=load.requests,
                in_flight_at_scrape=e.in_flight_at_scrape,
                in_flight_prompt_tokens=load.prompt_tokens,
                in_flight_decode_tokens=load.decode_tokens, recent_prompt_rate=load.prompt_rate,
                recent_prompt_at=load.prompt_at,
            ))  # fmt: skip
        return out

    def routable(self, model: str) -> list[str]:
        """The ids of the engines of `model` that take new requests."""
        return [e.id for e in self.fleet.engines_of(model) if e.routable]

    def _route(self, t: Ticket, engines: list[EngineSnapshot]) -> str:
        slot: Slot = t.payload
        return self.router.choose(slot.info, engines)

    # A request's life --------------------------------------------------------------------

    def prepare(self, info: RequestInfo, now: float) -> Admitting:
        """What admitting `info` would charge to which buckets, and whether OIT applies."""
        return self.admission.prepare(info, now)

    def submit(self, info: RequestInfo, a: Admitting, now: float) -> tuple[Decision, Slot]:
        """`info` passed its buckets: start it (START, `slot.engine` set and charged), queue
        it (QUEUED: in the fairness queue, or a batch request in the batch feed), or refuse it
        (FULL, UNAVAILABLE: the shell gives the bucket charge back)."""
        slot = Slot(next(self._handles), info, a.ticket, a.keys, a.cost)
        a.ticket.payload = slot
        a.ticket.handle = slot.handle
        if info.klass == "batch":
            deadline = self.deadline(info)
            decision, engine = self.batch.submit(a.ticket, info.model, deadline, now)
        else:
            decision, engine = self.dispatcher.submit(a.ticket, info.model, now)
        if decision in (Decision.START, Decision.QUEUED):
            self.admission.admitted(info, now)
            self.slots[slot.handle] = slot
        if decision is Decision.START:
            slot.engine, slot.started = engine, now
        return decision, slot

    def deadline(self, info: RequestInfo) -> float:
        """A batch request's deadline: its own, else its application's default after arrival."""
        if info.deadline is not None:
            return info.deadline
        tenant = self.cfg.tenants.get(info.tenant)
        app = tenant.apps.get(info.app) if tenant is not None else None
        span = app.batch_deadline_s if app is not None else None
        return info.arrival + (span or DAY_S)

    def cancel(self, slot: Slot) -> bool:
        """A waiting request leaves (client gone, timed out). False if it was picked in the
        meantime: then it holds a charge and must `finish`."""
        model = slot.info.model
        if self.batch.cancel(slot.ticket, model) or self.dispatcher.cancel(slot.ticket, model):
            self.slots.pop(slot.handle, None)
            slot.done = True
            return True
        return False

    def reroute(self, slot: Slot, tried: Iterable[str], now: float) -> str | None:
        """The request's engine failed before answering: move its charge to another engine of
        its model (one with room if any), or None when there is none left to try."""
        engines = self.snapshots(slot.info.model, exclude=set(tried))
        if not engines:
            return None
        engines = self.dispatcher.open_engines(slot.ticket, engines) or engines
        engine = self.router.choose(slot.info, engines)
        # Charged afresh from the ticket: the old charge may already be gone with its engine.
        t = slot.ticket
        self.ledger.charge(slot.handle, engine, prompt_tokens=t.prompt_tokens,
                           decode_tokens=t.predicted_output,
                           kv_tokens=t.prompt_tokens + t.expected_output, now=now)  # fmt: skip
        slot.engine = engine
        return engine

    def on_tokens(self, slot: Slot, n: int) -> None:
        slot.charged_output += n
        self.dispatcher.on_tokens(slot.ticket, slot.info.model, n)

    def finish(
        self, slot: Slot, prompt_tokens: int | None, output_tokens: int | None, now: float
    ) -> tuple[list[Slot], float]:
        """The request ended: its counters are settled with real usage and its charge leaves
        the ledger. Returns the waiting requests that start in its place, and what to add to
        its buckets (real use less what admission charged)."""
        if slot.done:
            return [], 0.0
        slot.done = True
        self.slots.pop(slot.handle, None)
        output = slot.charged_output if output_tokens is None else output_tokens
        if output != slot.charged_output:
            self.on_tokens(slot, output - slot.charged_output)
        prompt = prompt_tokens or slot.info.prompt_tokens
        engine = self.ledger.engine_of(slot.handle)
        model = slot.info.model
        if slot.started is not None and output_tokens is not None:
            self.batch.observe(model, now - slot.started, output)
        # Interactive requests waiting take the freed room first; batch work after them.
        started = self.dispatcher.finish(slot.ticket, model, prompt, output, now)
        started += self.batch.feed(model, now)
        if engine is not None:
            self._count_demand(slot.info, engine, prompt, output)
            if self.on_release is not None:
                self.on_release(engine)
        return _picked(started, now), prompt + output - slot.cost

    def _count_demand(self, info: RequestInfo, engine: str, prompt: int, output: int) -> None:
        region = next((e.region for e in self.fleet.engines_of(info.model) if e.id == engine), "")
        if not region:
            return  # the engine left the fleet meanwhile
        key = (info.model, region, info.klass)
        wall = self.clock()
        self.demand.add(key, wall, prompt=prompt, output=output)
        if self.on_demand is not None:
            self.on_demand(key, int(wall // 60), prompt, output)

    def poll(self, model: str, now: float) -> list[Slot]:
        """Start what can start now (an engine joined or came back, a window opened, a batch
        request's deadline came near)."""
        started = self.dispatcher.poll(model, now)
        return _picked(started + self.batch.feed(model, now), now)

    def expire(self, model: str, now: float) -> list[Slot]:
        """Take out the batch requests whose deadline passed while they waited: they never
        reached an engine (the shell answers them and gives their bucket charge back)."""
        out = []
        for t in self.batch.expire(model, now):
            slot: Slot = t.payload
            self.slots.pop(slot.handle, None)
            slot.done = True
            out.append(slot)
        return out

    def wake_at(self, model: str, now: float) -> float | None:
        """When a waiting request may start (rate limits, a batch deadline come near) or
        expire by time alone, if ever."""
        times = [t for t in (self.dispatcher.policy(model).wake_at(now),
                             self.batch.wake_at(model)) if t is not None]  # fmt: skip
        return min(times) if times else None

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys([*self.dispatcher.policies, *self.batch.queues]))


def _picked(started: list[tuple[Ticket, str]], now: float) -> list[Slot]:
    out = []
    for t, engine in started:
        slot: Slot = t.payload
        slot.engine, slot.started = engine, now
        out.append(slot)
    return out
