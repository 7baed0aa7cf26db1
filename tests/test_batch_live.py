"""The batch feed in the live gateway, with the official client: batch requests wait while
interactive load keeps their region busy, leave interactive requests their headroom, go to
another region with room, and get a 408, counted, once their deadline passes; the class and
deadline headers, and the class an application gives its requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, scrape
from tests.test_errors import assert_openai_error
from tests.test_gate import client_for, wait_for

GLOBEX = "sk-test-globex-chat"
BATCH = {"X-Fairway-Class": "batch"}
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
