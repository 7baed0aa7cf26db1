"""The simulator's frontend and the live gateway decide alike on the same sequence of events.

One config (three simulated engines that each take two requests in flight, round robin, FCFS
with two waiting requests per tenant) runs twice: through `gateway.simulate.GateFrontend` on
the cluster simulator, and through the gateway in-process with the official client. The
simulator's timeline (arrivals, and ends at the lengths the engines generate) is the script:
the live run sends the requests in the simulator's order of events, each once the gateway has
decided on the event before (started, queued or refused the request; started the next waiting
one in the place of one that ended), and ends a request where the simulator finished it by
closing its stream (its live length is far longer,
so no live request ends on its own). Then every request must have the same fate in both: refused
or not, started at its arrival or queued, the engine it ran on, and the event at which it
started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

from benchmarks.routing_sim import frontend, simulate, specs_of
from engines.cluster import Job
from engines.tokens import chat_prompt_tokens
from gateway.config.schema import Config, parse
from gateway.http.state import Gateway
from gateway.simulate import SimRequest, request_info
from tests.conftest import KEYS, MODEL, GatewayFactory, config_dict

ENGINES = 3
MAX_RUNNING = 2
MAX_QUEUE = 2
LIVE_OUTPUT = 4000  # live requests stream this long: minutes at this time scale
TIME_SCALE = 3.0
KEY = {tenant: key for key, (tenant, _) in KEYS.items()}


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float  # simulated seconds
    tenant: str
    output_tokens: int  # what the simulated engine generates


# Six fill the engines, four wait, two find their tenant's queue full; the first ends start
# the waiting ones where they ended; later arrivals find two engines with room, then none, and,
# once all is done, every engine idle (round robin's turn carries over).
SEQUENCE = (
    *(Arrival(0.001 * i, ("acme", "globex")[i % 2], 100 * (i + 1)) for i in range(6)),
    Arrival(0.010, "acme", 2000),
    Arrival(0.011, "globex", 2100),
    Arrival(0.012, "acme", 2200),
    Arrival(0.013, "acme", 50),  # acme has two waiting: refused
    Arrival(0.014, "globex", 2300),
    Arrival(0.015, "globex", 50),  # refused
    Arrival(5.0, "acme", 900),  # e1 and e2 have room by now
    Arrival(5.1, "globex", 950),
    Arrival(5.2, "acme", 1000),  # none has
    *(Arrival(1000.0 + i, ("globex", "acme")[i % 2], 80) for i in range(4)),
)


def config_doc() -> dict[str, Any]:
    engines = [{"kind": "sim", "id": f"e{i}", "max_running": MAX_RUNNING} for i in range(ENGINES)]
    # One probe at start-up and none during the test: the gauges stay as first scraped.
    doc = config_dict({"r0": {MODEL: engines}}, health_interval_s=3600.0, health_timeout_s=10.0)
    doc["sim"] = {"time_scale": TIME_SCALE, "seed": 1}
    doc["routing"] = {"policy": "round-robin"}
    doc["fairness"] = {"policy": "fcfs", "max_queue_per_tenant": MAX_QUEUE}
    return doc


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Request {i}, please."}],
            "max_tokens": LIVE_OUTPUT, "stream": True}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fate:
    outcome: str  # started (at its arrival), queued, refused
    engine: str | None
    started_at: int | None  # index of the event at which it started


def simulated(cfg: Config) -> tuple[list[tuple[str, int]], list[Fate]]:
    """The sequence through GateFrontend: its timeline (("arrive" | "end", request)) and the
    fate of each request."""
    jobs = []
    for i, a in enumerate(SEQUENCE):
        b = body(i)
        info = request_info(str(i), a.tenant, "chat", MODEL, chat_prompt_tokens(b["messages"]),
                            a.t, LIVE_OUTPUT)  # fmt: skip
        jobs.append(Job(str(i), a.t, MODEL, info.prompt_tokens, a.output_tokens,
                        SimRequest(info, b)))  # fmt: skip
    done = simulate(specs_of(cfg), frontend(cfg), jobs)
    timed = [(j.arrival, "arrive", int(j.id)) for j in done]
    timed += [(j.finished, "end", int(j.id)) for j in done if j.finished is not None]
    timed.sort()
    times = [t for t, _, _ in timed]
    assert len(set(times)) == len(times), "simultaneous events: the order would be arbitrary"
    events = [(kind, i) for _, kind, i in timed]
    index = {(t, kind): k for k, (t, kind, _) in enumerate(timed)}
    fates = []
    for j in sorted(done, key=lambda j: int(j.id)):
        if j.rejected is not None:
            assert j.rejected == "full"
            fates.append(Fate("refused", None, None))
            continue
        assert j.started is not None
        queued = j.started > j.arrival
        at = index[(j.started, "end" if queued else "arrive")]
        fates.append(Fate("queued" if queued else "started", j.engine, at))
    return events, fates


async def until(cond: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def live(start_gateway: GatewayFactory, events: list[tuple[str, int]]) -> list[Fate | None]:
    server, gw = await start_gateway(config_doc())
    assert isinstance(gw, Gateway)
    clients = {
        tenant: openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key,
                                   max_retries=0, timeout=120)
        for tenant, key in KEY.items()
    }  # fmt: skip
    core = gw.gate.core
    waiting = core.dispatcher.policy(MODEL).waiting
    tasks: dict[int, asyncio.Task[Any]] = {}  # the raw responses (headers) of the streams
    ended: set[int] = set()
    fates: list[Fate | None] = [None] * len(SEQUENCE)
    outcome: dict[int, str] = {}

    async def send(i: int) -> Any:
        b = body(i)
        return await clients[SEQUENCE[i].tenant].chat.completions.with_raw_response.create(
            model=MODEL, messages=b["messages"], max_tokens=LIVE_OUTPUT, stream=True,
            extra_body={"sim_output_tokens": LIVE_OUTPUT},
        )  # fmt: skip

    def answered(i: int) -> bool:
        t = tasks[i]
        return t.done() and t.exception() is None

    def settled() -> bool:
        """Every request the gateway has started has its response headers at the client."""
        streaming = sum(answered(i) for i in tasks if i not in ended)
        return streaming == core.ledger.total()

    try:
        for k, (kind, i) in enumerate(events):
            if kind == "arrive":
                before = waiting()
                tasks[i] = asyncio.get_running_loop().create_task(send(i))

                def decided(t: asyncio.Task[Any] = tasks[i], n: int = before) -> bool:
                    return t.done() or waiting() > n

                await until(decided, f"a decision on request {i}")
                exc = tasks[i].exception() if tasks[i].done() else None
                if isinstance(exc, openai.RateLimitError):
                    assert exc.code == "queue_full", exc
                    fates[i] = Fate("refused", None, None)
                    continue
                assert exc is None, exc
                outcome[i] = "started" if tasks[i].done() else "queued"
            else:
                resp = await tasks[i]
                slots = len(core.slots)
                await resp.http_response.aclose()
                ended.add(i)

                def released(n: int = slots) -> bool:
                    return len(core.slots) < n

                await until(released, f"the end of request {i}")
            await until(settled, f"the requests started at event {k}")
            for j, t in tasks.items():
                if fates[j] is None and answered(j):
                    engine = t.result().headers["X-Fairway-Engine"]
                    fates[j] = Fate(outcome[j], engine, k)
        assert core.ledger.total() == 0 and not core.slots and waiting() == 0
    finally:
        for t in tasks.values():
            if t.done() and t.exception() is None:
                await t.result().http_response.aclose()
            t.cancel()
        for c in clients.values():
            await c.close()
    return fates


async def test_the_simulator_and_the_gateway_make_the_same_decisions(
    start_gateway: GatewayFactory,
) -> None:
    cfg = parse(config_doc())
    events, expected = simulated(cfg)
    # The sequence covers what it is meant to: queueing, refusals, starts from the queue,
    # arrivals that find only some engines with room.
    outcomes = [f.outcome for f in expected]
    assert outcomes.count("refused") == 2 and outcomes.count("queued") >= 5, outcomes
    assert {f.engine for f in expected if f.outcome == "queued"} == {"e0", "e1", "e2"}
    assert [f.outcome for f in expected[12:15]] == ["started", "started", "queued"]
    got = await live(start_gateway, events)
    assert got == expected
