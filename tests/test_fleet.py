"""One ledger and a fleet that changes while serving, against a live gateway.

The ledger: requests that share a client's `X-Request-Id`, retries, cancellations and removed
engines all leave nothing counted in flight. The fleet: the admin API adds, drains and
removes engines while requests run; a config reload (`POST /admin/reload`, SIGHUP) applies a
valid file as a diff and refuses an invalid one whole.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w

from gateway.http.auth import digest
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, free_port, scrape

ADMIN = "sk-test-admin"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
E0, E1 = f"us-east/{MODEL}/0", f"us-east/{MODEL}/1"


def fleet_config(engines: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg = config_dict(engines or {"us-east": {MODEL: [{"kind": "sim"}, {"kind": "sim"}]}})
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    return cfg


async def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def client_for(server: Any, key: str = ACME) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key, max_retries=0,
                              timeout=30)  # fmt: skip


async def chat(c: openai.AsyncOpenAI, tokens: int = 8, **kw: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model=kw.pop("model", MODEL), messages=[{"role": "user", "content": "hi"}],
        max_tokens=tokens, extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip


def idle(gw: Gateway) -> bool:
    return gw.gate.core.ledger.total() == 0 and all(
        load.requests == load.prompt_tokens == load.decode_tokens == load.kv_tokens == 0
        for load in gw.gate.core.ledger.loads.values()
    )


async def test_requests_sharing_a_request_id_leave_nothing_in_flight(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = fleet_config({"us-east": {MODEL: [{"kind": "sim", "max_running": 2},
                                            {"kind": "sim", "max_running": 2}]}})  # fmt: skip
    server, gw = await start_gateway(cfg)
    c = client_for(server)
    same = {"X-Request-Id": "dup-1"}
    streams = [chat(c, 20, stream=True, extra_headers=same) for _ in range(6)]
    wholes = [chat(c, 20, extra_headers=same) for _ in range(6)]
    # Some of them go away mid-way: they must not leave their slot counted either.
    url = server.make_url("/v1/chat/completions")
    body = {"model": MODEL, "stream": True, "max_tokens": 200, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    hdrs = {"Authorization": f"Bearer {ACME}", **same}

    async def leave_early() -> None:
        async with http.post(url, json=body, headers=hdrs) as r:
            assert r.status == 200
            await r.content.readline()

    results = await asyncio.gather(*streams, *wholes, *(leave_early() for _ in range(4)))
    for raw in results[:12]:
        assert raw.http_response.status_code == 200
        assert raw.headers["x-request-id"] == "dup-1"  # echoed, never used as a key
    await wait_for(lambda: asyncio.sleep(0, idle(gw)))
    # The model still serves: no slot stayed busy.
    again = await asyncio.gather(*(chat(c, 4, extra_headers=same) for _ in range(8)))
    assert {r.headers["x-fairway-engine"] for r in again} == {E0, E1}
    await wait_for(lambda: asyncio.sleep(0, idle(gw)))


async def test_a_retry_moves_the_charge_to_the_engine_that_serves(
    start_gateway: GatewayFactory,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = fleet_config({"us-east": {MODEL: [{"kind": "vllm", "url": dead, "id": "dead"},
                                            {"kind": "sim", "id": "live"}]}})  # fmt: skip
    cfg["routing"] = {"policy": "round-robin"}
    cfg["server"]["health_interval_s"] = 60  # only the failed connection ejects it
    server, gw = await start_gateway(cfg)
    seen: list[int] = []
    orig = gw.gate.core.reroute

    def spy(slot: Any, tried: Any, now: float) -> str | None:
        out = orig(slot, tried, now)
        seen.append(gw.gate.core.ledger.in_flight("dead"))
        return out

    gw.gate.core.reroute = spy  # type: ignore[method-assign]
    raws = [await chat(client_for(server)) for _ in range(2)]
    assert [r.headers["x-fairway-engine"] for r in raws] == ["live", "live"]
    assert seen == [0]  # one retry, and the dead engine held nothing after it
    assert idle(gw)


async def test_admin_fleet_api_adds_drains_and_removes_engines(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(fleet_config())
    url = server.make_url
    async with http.get(url("/admin/engines")) as r:
        assert r.status == 401
    async with http.get(url("/admin/engines"), headers=ADMIN_AUTH) as r:
        listed = (await r.json())["engines"]
    assert [(e["id"], e["state"], e["kind"], e["in_flight"]) for e in listed] == [
        (E0, "active", "sim", 0), (E1, "active", "sim", 0)]  # fmt: skip

    # Bad bodies name the field; unknown ids are 404.
    for body, param in (({"model": MODEL, "kind": "sim"}, "region"),
                        ({"region": "r", "model": MODEL, "kind": "sim", "gpu": "Z80"}, "gpu"),
                        ({"region": "r", "model": MODEL, "kind": "sim", "bogus": 1}, "bogus"),
                        ({"region": "r", "model": MODEL, "kind": "vllm"}, "url")):  # fmt: skip
        async with http.post(url("/admin/engines"), json=body, headers=ADMIN_AUTH) as r:
            err = (await r.json())["error"]
            assert r.status == 400, err
            assert param in (err["param"] or "") + err["message"], err
    async with http.post(url("/admin/engines/nope/drain"), headers=ADMIN_AUTH) as r:
        assert r.status == 404
    async with http.delete(url("/admin/engines/nope"), headers=ADMIN_AUTH) as r:
        assert r.status == 404

    # A new model joins: /v1/models and routing follow.
    c = client_for(server)
    assert "qwen-new" not in [m.id for m in (await c.models.list()).data]
    new = {"region": "eu-west", "model": "qwen-new", "kind": "sim", "arch": "llama-3.1-8b"}
    async with http.post(url("/admin/engines"), json=new, headers=ADMIN_AUTH) as r:
        added = await r.json()
        assert r.status == 201, added
    assert added["id"] == "eu-west/qwen-new/0" and added["state"] == "active"
    assert "qwen-new" in [m.id for m in (await c.models.list()).data]
    raw = await chat(c, model="qwen-new")
    assert raw.headers["x-fairway-engine"] == "eu-west/qwen-new/0"

    # Drain E0 while a long stream runs there: new requests avoid it, the stream completes,
    # then E0 leaves.
    gw.gate.core.router = _Fixed(E0)  # type: ignore[assignment]
    stream = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=60, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    first = await stream.__anext__()
    assert gw.gate.core.ledger.in_flight(E0) == 1
    async with http.post(url(f"/admin/engines/{E0}/drain"), headers=ADMIN_AUTH) as r:
        assert r.status == 202 and (await r.json())["state"] == "draining"
    gw.gate.core.router = _First()  # type: ignore[assignment]
    during = await chat(c)
    assert during.headers["x-fairway-engine"] == E1
    chunks = [first] + [ch async for ch in stream]
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == 60
    await wait_for(lambda: asyncio.sleep(0, E0 not in gw.registry.engines))
    assert E0 not in gw.gate.core.ledger.loads

    # DELETE an idle engine: gone at once, its model too.
    async with http.delete(url("/admin/engines/eu-west/qwen-new/0"), headers=ADMIN_AUTH) as r:
        assert r.status == 200 and (await r.json())["state"] == "removed"
    assert "qwen-new" not in [m.id for m in (await c.models.list()).data]
    with pytest.raises(openai.NotFoundError):
        await chat(c, model="qwen-new")
    text = await (await http.get(url("/metrics"))).text()
    # Its gauges go; per-request counters stay, as history.
    assert not [ln for ln in text.splitlines()
                if ln.startswith(("fairway_engine_healthy", "fairway_engine_in_flight"))
                and f'engine="{E0}"' in ln]  # fmt: skip
    assert idle(gw)


async def test_drain_deadline_ends_what_still_runs(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = fleet_config({"us-east": {MODEL: [{"kind": "sim"}]}})
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token: 2000 tokens outlast the deadline
    server, gw = await start_gateway(cfg)
    body = {"model": MODEL, "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    auth = {"Authorization": f"Bearer {ACME}"}
    async with http.post(server.make_url("/v1/chat/completions"), json=body, headers=auth) as r:
        assert r.status == 200
        await r.content.readline()
        async with http.delete(server.make_url(f"/admin/engines/{E0}"),
                               params={"timeout_s": "0.2"}, headers=ADMIN_AUTH) as d:  # fmt: skip
            assert d.status == 202
        rest = (await r.content.read()).decode()
    assert "left the fleet" in rest and rest.rstrip().endswith("data: [DONE]")
    await wait_for(lambda: asyncio.sleep(0, not gw.registry.engines))
    assert idle(gw)
    async with http.get(server.make_url("/healthz")) as h:
        assert h.status == 503


class _Fixed:
    name = "fixed"

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def choose(self, request: Any, engines: Any) -> str:
        ids = [e.id for e in engines]
        return self.engine if self.engine in ids else ids[0]


class _First:
    name = "first"

    def choose(self, request: Any, engines: Any) -> str:
        return str(engines[0].id)


def _write(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(tomli_w.dumps(cfg))


async def test_reload_applies_a_valid_file_and_refuses_an_invalid_one(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = tmp_path / "fairway.toml"
    cfg = fleet_config()
    _write(path, cfg)
    assert tomllib.loads(path.read_text())["engines"] == cfg["engines"]
    server, gw = await start_gateway(cfg, config_path=str(path))
    c = client_for(server)
    await chat(c, 20)
    counter = (await (await http.get(server.make_url("/admin/tenants"), headers=ADMIN_AUTH))
               .json())["tenants"]["acme"]["models"][MODEL]["counter"]  # fmt: skip
    assert counter > 0

    # A new tenant key, a new weight, one engine fewer and one new engine.
    new_key = "sk-test-initech-batch"
    cfg["tenants"]["initech"] = {"weight": 3.0, "apps": {"batch": {}},
                                 "keys": [{"sha256": digest(new_key), "app": "batch"}]}  # fmt: skip
    cfg["tenants"]["acme"]["weight"] = 2.0
    cfg["engines"] = {"us-east": {MODEL: [{"kind": "sim"}]},
                      "eu-west": {MODEL: [{"kind": "sim", "gpu": "A100"}]}}  # fmt: skip
    _write(path, cfg)
    with pytest.raises(openai.AuthenticationError):
        await chat(client_for(server, new_key))
    async with http.post(server.make_url("/admin/reload"), headers=ADMIN_AUTH) as r:
        result = await r.json()
        assert r.status == 200, result
    assert result["engines"] == {"added": [f"eu-west/{MODEL}/0"], "removed": [E1], "changed": []}
    raw = await chat(client_for(server, new_key))
    assert raw.http_response.status_code == 200
    await wait_for(lambda: asyncio.sleep(0, E1 not in gw.registry.engines))
    tenants = (await (await http.get(server.make_url("/admin/tenants"), headers=ADMIN_AUTH))
               .json())["tenants"]  # fmt: skip
    assert tenants["acme"]["weight"] == 2.0
    assert tenants["acme"]["models"][MODEL]["counter"] >= counter  # counters survive
    assert set(gw.registry.engines) == {E0, f"eu-west/{MODEL}/0"}

    # An invalid file changes nothing and says why.
    cfg["tenants"]["acme"]["weight"] = -1
    _write(path, cfg)
    async with http.post(server.make_url("/admin/reload"), headers=ADMIN_AUTH) as r:
        bad = await r.json()
        assert r.status == 400
    assert any("tenants.acme.weight" in e for e in bad["errors"]), bad
    assert bad["error"]["code"] == "invalid_config"
    assert gw.cfg.tenants["acme"].weight == 2.0
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_config_reloads_total", result="ok") == 1
    assert scrape(text, "fairway_config_reloads_total", result="error") == 1

    # SIGHUP re-reads the file too.
    cfg["tenants"]["acme"]["weight"] = 5.0
    _write(path, cfg)
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: asyncio.sleep(0, gw.cfg.tenants["acme"].weight == 5.0))
    assert idle(gw)
