"""The batch feed: batch requests wait in a queue of their own, earliest deadline first, and
start only where a region has room (or once their deadline is near); one whose deadline passes
while it waits expires. Pure tests of the queue and of the gate core's feed, and the cluster
simulator's frontend; tests/test_batch_live.py runs the feed in the live gateway."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from engines.cluster import ClusterSim, EngineSpec, Job
from gateway.config.schema import ConfigError, parse
from gateway.core.batch import PRIOR_S_PER_TOKEN, BatchQueue
from gateway.core.dispatch import Decision
from gateway.core.fair_queue import Ticket
from gateway.core.gate import GateCore, Slot
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import RequestInfo
from gateway.routing.latency import build_policy
from gateway.simulate import GateFrontend, SimRequest, request_info
from tests.conftest import KEYS, MODEL, config_dict

# The queue ----------------------------------------------------------------------------------


def ticket(handle: int, tenant: str = "acme", expected_output: int = 100) -> Ticket:
    return Ticket(f"r{handle}", tenant, "chat", 10, expected_output, 0.0, handle=handle)


def test_the_queue_is_earliest_deadline_first_ties_in_arrival_order() -> None:
    q = BatchQueue()
    for handle, deadline in [(1, 50.0), (2, 10.0), (3, 30.0), (4, 10.0), (5, 40.0)]:
        q.push(ticket(handle), deadline, service_s=1.0)
    assert [w.ticket.handle for w in q.order] == [2, 4, 3, 5, 1]
    q.take(q.order[2])  # number 3 leaves (started or cancelled)
    assert [w.ticket.handle for w in q.order] == [2, 4, 5, 1]
    assert [w.ticket.handle for w in q.expired(10.0)] == [2, 4]  # at the deadline: expired
    assert [w.ticket.handle for w in q.order] == [5, 1] and q.backlog("acme") == 2


def test_urgency_comes_when_the_slack_is_under_the_service_time() -> None:
    q = BatchQueue()
    q.push(ticket(1), deadline=100.0, service_s=10.0)  # urgent from 80 s
    q.push(ticket(2), deadline=90.0, service_s=1.0)  # from 88 s
    q.push(ticket(3), deadline=95.0, service_s=20.0)  # from 55 s
    assert q.next_event() == 55.0
    q.heat(79.0)
    assert [w.ticket.handle for w in q.urgent] == [3]
    assert q.next_event() == 80.0
    q.heat(88.0)
    assert [w.ticket.handle for w in q.urgent] == [2, 3, 1]  # by deadline among the urgent
    assert q.next_event() == 90.0  # none left to become urgent: the next deadline
    q.take(q.urgent[0])
    assert [w.ticket.handle for w in q.urgent] == [3, 1] and len(q) == 2
    assert [w.ticket.handle for w in q.expired(200.0)] == [3, 1] and q.next_event() is None


# The gate core's feed, on plain values ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class View:
    id: str
    region: str
    model: str = MODEL
    routable: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight_at_scrape: int = 0


class Fleet:
    def __init__(self, views: list[View]) -> None:
        self.views = views

    def engines_of(self, model: str) -> list[View]:
        return [v for v in self.views if v.model == model]


class FirstOpen:
    """The first engine offered (in fleet order): region `a` first when it has room."""

    name = "first"

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        return engines[0].id


A, B = f"a/{MODEL}/0", f"b/{MODEL}/0"


def two_regions(max_running: int = 4) -> GateCore:
    engines = {r: {MODEL: [{"kind": "sim", "max_running": max_running}]} for r in ("a", "b")}
    cfg = parse(config_dict(engines))
    return GateCore(cfg, Fleet([View(A, "a"), View(B, "b")]), FirstOpen())


def arrive(core: GateCore, n: int, now: float, **kw: Any) -> tuple[Decision, Slot]:
    info = replace(request_info(f"r{n}", "acme", "chat", MODEL, 10, now, max_tokens=20), **kw)
    return core.submit(info, core.prepare(info, now), now)


def test_batch_goes_to_the_least_utilised_region_and_waits_while_all_are_busy() -> None:
    core = two_regions()
    for i in range(3):
        assert arrive(core, i, 0.0) == (Decision.START, core.slots[i + 1])
    assert core.ledger.in_flight(A) == 3  # region a at 0.75
    decision, slot = arrive(core, 3, 0.0, klass="batch")
    assert decision is Decision.START and slot.engine == B  # b is idle
    for i in range(4, 7):
        arrive(core, i, 0.0)  # a full; b at 0.75 with the batch request
    assert (core.ledger.in_flight(A), core.ledger.in_flight(B)) == (4, 3)
    decision, waiting = arrive(core, 7, 0.0, klass="batch")
    assert decision is Decision.QUEUED and core.batch.waiting() == {MODEL: 1}
    # Interactive requests are not held back: b's last slot is theirs.
    decision, last = arrive(core, 8, 0.0)
    assert decision is Decision.START and last.engine == B
    # An interactive request ends in b (0.75 again, not below 0.6): the batch request waits on.
    started, _ = core.finish(last, 10, 20, 1.0)
    assert started == [] and core.batch.waiting() == {MODEL: 1}
    # Another ends there: b is at 0.5, below feed_below, and the batch request starts there.
    b_slot = next(s for s in core.slots.values() if s.engine == B and s.info.klass != "batch")
    started, _ = core.finish(b_slot, 10, 20, 2.0)
    assert started == [waiting] and waiting.engine == B and waiting.started == 2.0
    assert core.batch.waiting() == {MODEL: 0}


def test_interactive_waiting_go_before_batch_and_batch_in_deadline_order() -> None:
    core = two_regions(max_running=1)
    for i in range(2):
        arrive(core, i, 0.0)  # both engines full
    batch = [arrive(core, 10 + i, 0.0, klass="batch", deadline=d)[1]
             for i, d in enumerate((300.0, 100.0, 200.0))]  # fmt: skip
    decision, queued = arrive(core, 2, 0.0)
    assert decision is Decision.QUEUED
    order: list[Slot] = []
    for now in (1.0, 2.0, 3.0, 4.0, 5.0):
        running = next(s for s in core.slots.values() if s.engine)
        started, _ = core.finish(running, 10, 20, now)
        order += started
    assert order == [queued, batch[1], batch[2], batch[0]]


def test_a_near_deadline_is_fed_regardless_of_utilisation_and_a_passed_one_expires() -> None:
    core = two_regions()
    for i in range(7):
        arrive(core, i, 0.0)  # a full, b at 0.75
    far = arrive(core, 10, 0.0, klass="batch", deadline=1000.0)[1]
    # 20 tokens expected at the prior pace: one second of service. A deadline 1.5 s away
    # leaves a slack of 0.5 s, under that: it goes to b's last slot at once.
    service = PRIOR_S_PER_TOKEN * 20
    decision, near = arrive(core, 11, 0.0, klass="batch", deadline=1.5 * service)
    assert decision is Decision.START and near.engine == B
    assert core.batch.waiting() == {MODEL: 1}
    # Now no engine has room: one with a near deadline waits, and the core wakes up for it.
    late = arrive(core, 12, 0.0, klass="batch", deadline=3 * service)[1]
    assert core.wake_at(MODEL, 0.0) == 3 * service - 2 * service  # when it becomes urgent
    assert core.poll(MODEL, service) == []  # urgent, but nowhere to go
    assert core.wake_at(MODEL, service) == 3 * service  # its deadline
    assert core.expire(MODEL, 2.9 * service) == []
    assert core.expire(MODEL, 3 * service) == [late] and late.done and not late.engine
    assert late.handle not in core.slots and not core.cancel(late)
    assert core.batch.waiting() == {MODEL: 1}
    assert core.wake_at(MODEL, 3 * service) == 1000.0 - 2 * service
    assert core.cancel(far) and core.batch.waiting() == {MODEL: 0}
    for s in [s for s in core.slots.values() if s.engine]:
        core.finish(s, 10, 20, 4.0)
    assert core.ledger.total() == 0 and not core.slots


def test_a_batch_requests_default_deadline_is_its_applications() -> None:
    raw = config_dict()
    raw["tenants"]["acme"]["batch_deadline_s"] = 600.0
    raw["tenants"]["acme"]["apps"]["chat"]["batch_max_deadline_s"] = 3600.0
    cfg = parse(raw)
    app = cfg.tenants["acme"].apps["chat"]
    assert (app.batch_deadline_s, app.batch_max_deadline_s) == (600.0, 3600.0)
    core = GateCore(cfg, Fleet([]), FirstOpen())
    info = replace(request_info("r", "acme", "chat", MODEL, 10, 5.0), klass="batch")
    assert core.deadline(info) == 605.0
    assert core.deadline(replace(info, tenant="globex")) == 5.0 + 24 * 3600
    raw["tenants"]["acme"]["apps"]["chat"]["batch_max_deadline_s"] = 60.0
    assert parse(raw).tenants["acme"].apps["chat"].batch_deadline_s == 60.0  # cut to its cap
    raw["tenants"]["acme"]["apps"]["chat"]["batch_deadline_s"] = 90.0  # beside it: a mistake
    with pytest.raises(ConfigError, match=r"tenants\.acme\.apps\.chat\.batch_deadline_s must be"):
        parse(raw)


# The simulator's frontend ---------------------------------------------------------------------


def test_simulated_batch_jobs_start_before_their_deadline_or_expire_none_lost() -> None:
    engines = [{"kind": "sim", "id": f"e{i}", "max_running": 8} for i in range(2)]
    cfg = parse(config_dict({"r0": {MODEL: engines}}))
    front = GateFrontend(cfg, build_policy("round-robin"), oit=False)
    tenants = sorted({t for t, _ in KEYS.values()})
    jobs: list[Job] = []
    # Two seconds of more interactive work than the engines take (a queue forms), then a
    # minute of about 0.8 of their limits: batch work goes in only when its deadline is near.
    t, i = 0.0, 0
    while t < 60.0:
        info = request_info(f"i{i}", tenants[i % 2], "chat", MODEL, 200, t, max_tokens=300)
        jobs.append(Job(info.id, t, MODEL, 200, 300, info=SimRequest(info)))
        t, i = t + (0.025 if t < 2.0 else 0.22), i + 1
    due = (2.0, 15.0, 600.0)
    for i in range(60):
        t = 0.5 + i * 0.5
        info = replace(request_info(f"b{i}", "acme", "chat", MODEL, 200, t, max_tokens=100),
                       klass="batch", deadline=t + due[i % 3])  # fmt: skip
        jobs.append(Job(info.id, t, MODEL, 200, 100, info=SimRequest(info)))
    jobs.sort(key=lambda j: j.arrival)
    sim = ClusterSim([EngineSpec(f"e{i}", "r0", MODEL) for i in range(2)], front)
    front.sim = sim
    done = sim.run(jobs)
    assert len(done) == len(jobs)
    assert all(j.finished is not None for j in done if j.id.startswith("i"))
    batch = [j for j in done if j.id.startswith("b")]
    expired = [j for j in batch if j.rejected == "batch_deadline_exceeded"]
    served = [j for j in batch if j.finished is not None]
    assert len(expired) + len(served) == len(batch)  # none lost, none both
    assert all(j.started is None for j in expired)
    deadline = {j.id: j.info.info.deadline for j in batch}
    assert all(j.started is not None and j.started < deadline[j.id] for j in served)
    in_time = [j for j in served if j.finished is not None and j.finished <= deadline[j.id]]
    assert len(in_time) >= 0.9 * len(served)
    by_due = [[j for j in batch if int(j.id[1:]) % 3 == k] for k in range(3)]
    for group in by_due[:2]:  # some got in near their deadline, others found no room in time
        assert any(j in expired for j in group) and any(j in in_time for j in group)
    assert all(j in in_time for j in by_due[2])  # ten minutes to spare: all served in time
    assert front.core.ledger.total() == 0 and not front.core.slots
