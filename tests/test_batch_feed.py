"""The batch feed: batch requests wait in a queue of their own, earliest deadline first, and
start only where a region has room (or once their deadline is near); one whose deadline passes
while it waits gets a 408, counted. Pure tests of the queue and of the gate core's feed, the
live gateway with the official client, and the cluster simulator's frontend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import openai
import pytest

from engines.cluster import ClusterSim, EngineSpec, Job
from gateway.config.schema import ConfigError, parse
from gateway.core.batch import PRIOR_S_PER_TOKEN, BatchQueue
from gateway.core.dispatch import Decision
from gateway.core.fairness import Ticket
from gateway.core.gate import GateCore, Slot
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import RequestInfo
from gateway.http.state import Gateway
from gateway.routing.latency import build_policy
from gateway.simulate import GateFrontend, SimRequest, request_info
from tests.conftest import ACME, KEYS, MODEL, GatewayFactory, config_dict, scrape
from tests.test_errors import assert_openai_error
from tests.test_gate import client_for, wait_for

GLOBEX = "sk-test-globex-chat"
BATCH = {"X-Fairway-Class": "batch"}


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


# The live gateway ---------------------------------------------------------------------------

ONE = f"us-east/{MODEL}/0"
EU = f"eu-west/{MODEL}/0"


def live_config(max_running: int = 4, eu: bool = False) -> dict[str, Any]:
    engines: dict[str, Any] = {"us-east": {MODEL: [{"kind": "sim", "max_running": max_running}]}}
    if eu:
        engines["eu-west"] = {MODEL: [{"kind": "sim", "max_running": max_running}]}
    cfg = config_dict(engines)
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token
    cfg["routing"] = {"preferred_regions": ["us-east"]}
    return cfg


async def chat(c: openai.AsyncOpenAI, tokens: int, **kw: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=tokens,
        extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip


def waiting(gw: Gateway) -> int:
    return gw.gate.core.batch.waiting().get(MODEL, 0)


def in_flight(gw: Gateway, engine: str = ONE) -> int:
    return gw.gate.core.ledger.in_flight(engine)


async def metrics(http: aiohttp.ClientSession, server: Any) -> str:
    return await (await http.get(server.make_url("/metrics"))).text()


async def test_batch_waits_while_interactive_load_keeps_the_region_busy(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(live_config())
    acme = client_for(server, ACME)
    ends: list[str] = []

    async def one(name: str, tokens: int, **kw: Any) -> None:
        r = await chat(acme, tokens, **kw)
        assert r.http_response.status_code == 200
        ends.append(name)

    busy = [asyncio.create_task(one(f"i{i}", 150)) for i in range(3)]
    await wait_for(lambda: in_flight(gw) == 3)  # 0.75 of the engine's limit of 4
    batch = asyncio.create_task(one("batch", 10, extra_headers=BATCH))
    await wait_for(lambda: waiting(gw) == 1)
    assert scrape(await metrics(http, server), "fairway_batch_waiting", model=MODEL) == 1
    await asyncio.sleep(0.3)
    assert waiting(gw) == 1 and in_flight(gw) == 3  # a slot is free, but it is the headroom
    await asyncio.gather(*busy, batch)
    # Ten tokens take 80 ms: had it started at once, it would have ended first.
    assert ends[-1] == "batch" and sorted(ends[:3]) == ["i0", "i1", "i2"]
    assert scrape(await metrics(http, server), "fairway_batch_waiting", model=MODEL) == 0
    await wait_for(lambda: gw.gate.core.ledger.total() == 0 and not gw.gate.core.slots)
    assert [k for k in gw.gate.core.demand.series_keys() if k[2] == "batch"] == [
        (MODEL, "us-east", "batch")
    ]


async def test_a_flood_of_batch_leaves_interactive_requests_their_headroom(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway(live_config())
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    flood = [asyncio.create_task(chat(acme, 150, extra_headers=BATCH)) for _ in range(12)]
    await wait_for(lambda: waiting(gw) == 9)  # three started (0, 0.25, 0.5 < 0.6), nine wait
    ttfts: list[float] = []
    for _ in range(5):
        t0 = time.perf_counter()
        stream = await globex.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttfts.append(time.perf_counter() - t0)
                break
        async for _ in stream:
            pass
        # Never more than 0.75 of the engine in batch work, whatever waits.
        running = [s for s in gw.gate.core.slots.values() if s.engine and s.info.klass == "batch"]
        assert len(running) <= 3 and gw.gate.dispatcher.policy(MODEL).waiting() == 0
    # Queued behind batch work, an interactive request would wait for a 150-token answer
    # (1.2 s); with its headroom it starts at once.
    assert max(ttfts) < 0.5, ttfts
    answers = await asyncio.gather(*flood)
    assert all(r.http_response.status_code == 200 for r in answers)  # none dropped
    await wait_for(lambda: gw.gate.core.ledger.total() == 0 and waiting(gw) == 0)


async def test_a_batch_request_past_its_deadline_gets_a_408_and_is_counted(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(live_config(max_running=1))
    acme = client_for(server, ACME)
    busy = asyncio.create_task(chat(acme, 250))  # holds the only slot for about 2 s
    await wait_for(lambda: in_flight(gw) == 1)
    t0 = time.perf_counter()
    with pytest.raises(openai.APIStatusError) as exc:
        await chat(acme, 10, extra_headers={**BATCH, "X-Fairway-Deadline": "0.4"})
    waited = time.perf_counter() - t0
    assert exc.value.status_code == 408
    err = assert_openai_error(exc.value.response.content, 408)
    assert err["type"] == "timeout_error" and err["code"] == "batch_deadline_exceeded"
    assert "X-Fairway-Deadline" in err["message"]
    assert 0.35 < waited < 1.5  # answered at its deadline, not when the slot freed
    text = await metrics(http, server)
    assert scrape(text, "fairway_batch_expired_total", model=MODEL) == 1
    assert scrape(text, "fairway_rejected_requests_total", tenant="acme", status="408") == 1
    assert waiting(gw) == 0
    assert (await busy).http_response.status_code == 200
    await wait_for(lambda: gw.gate.core.ledger.total() == 0 and not gw.gate.core.slots)


async def test_a_batch_request_is_fed_to_another_region_with_room(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(live_config(max_running=2, eu=True))
    acme = client_for(server, ACME)
    busy = [asyncio.create_task(chat(acme, 150)) for _ in range(2)]
    await wait_for(lambda: in_flight(gw) == 2)  # us-east, the preferred region, is full
    assert in_flight(gw, EU) == 0
    r = await chat(acme, 10, extra_headers={**BATCH, "X-Fairway-Regions": "us-east"})
    assert r.http_response.status_code == 200
    await asyncio.gather(*busy)
    text = await metrics(http, server)
    assert scrape(text, "fairway_requests_total", engine=EU, status="200") == 1
    assert scrape(text, "fairway_requests_total", engine=ONE, status="200") == 2
    await wait_for(lambda: gw.gate.core.ledger.total() == 0)


def class_config() -> dict[str, Any]:
    cfg = live_config()
    cfg["tenants"]["globex"]["demand_class"] = "batch"
    cfg["tenants"]["acme"]["apps"]["chat"]["batch_max_deadline_s"] = 60.0
    return cfg


@pytest.mark.parametrize(
    ("key", "headers", "param", "words"),
    [
        (ACME, {"X-Fairway-Class": "urgent"}, "X-Fairway-Class", "must be one of"),
        (ACME, {"X-Fairway-Class": ""}, "X-Fairway-Class", "must be one of"),
        (GLOBEX, {"X-Fairway-Class": "interactive"}, "X-Fairway-Class",
         "tenants.globex.apps.chat.allow_interactive"),
        (ACME, {"X-Fairway-Deadline": "10"}, "X-Fairway-Deadline", "batch requests only"),
        *((ACME, {**BATCH, "X-Fairway-Deadline": v}, "X-Fairway-Deadline",
           "tenants.acme.apps.chat.batch_max_deadline_s")
          for v in ("0", "0.0", "-1", "abc", "1e3", "nan", "inf", "61", "1_0", "")),
        (GLOBEX, {"X-Fairway-Deadline": "86401"}, "X-Fairway-Deadline", "at most 86400"),
    ],
)  # fmt: skip
async def test_bad_class_and_deadline_headers_are_400s_naming_the_header(
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    key: str,
    headers: dict[str, str],
    param: str,
    words: str,
) -> None:
    server, gw = await start_gateway(class_config())
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with http.post(server.make_url("/v1/chat/completions"), json=body,
                         headers={"Authorization": f"Bearer {key}", **headers}) as r:  # fmt: skip
        assert r.status == 400
        err = assert_openai_error(await r.read(), 400)
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"
    assert gw.gate.core.ledger.total() == 0 and not gw.gate.core.slots


async def test_the_class_comes_from_the_application_and_may_be_downgraded(
    start_gateway: GatewayFactory,
) -> None:
    cfg = class_config()
    cfg["tenants"]["globex"]["apps"]["chat"]["allow_interactive"] = True
    server, gw = await start_gateway(cfg)
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    await chat(globex, 5)  # batch by its config
    await chat(globex, 5, extra_headers={"X-Fairway-Class": "Interactive"})  # allowed here
    await chat(acme, 5, extra_headers={**BATCH, "X-Fairway-Deadline": "60"})  # downgraded
    await chat(acme, 5)
    demand = gw.gate.core.demand

    def counts() -> dict[str, int]:
        until = int(time.time() // 60) + 1
        return {k[2]: sum(p.requests for p in demand.series(k, until - 5, until))
                for k in demand.series_keys()}  # fmt: skip

    await wait_for(lambda: sum(counts().values()) == 4)
    assert counts() == {"batch": 2, "interactive": 2}


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
