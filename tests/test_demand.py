"""Per-minute demand counters: what the planner forecasts from."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from gateway.core.demand import Demand, Point
from gateway.http.auth import digest
from tests.conftest import ACME, MODEL, config_dict
from tests.test_gate import redis_server, redis_url  # noqa: F401  (fixtures)

KEY = ("llama-3.1-8b", "us-east", "interactive")
ADMIN = "sk-test-admin"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_requests_count_in_the_minute_they_end() -> None:
    d = Demand(keep_minutes=60)
    d.add(KEY, 120.0, prompt=100, output=20)
    d.add(KEY, 179.9, prompt=50, output=5)
    d.add(KEY, 240.0, prompt=7, output=1)
    assert d.series(KEY, 1, 5) == [
        Point(1, 0, 0, 0), Point(2, 2, 150, 25), Point(3, 0, 0, 0), Point(4, 1, 7, 1),
    ]  # fmt: skip
    assert d.series_keys() == [KEY]
    assert d.series(("other", "r", "batch"), 0, 10) == []


def test_only_the_last_keep_minutes_are_kept_in_bounded_memory() -> None:
    d = Demand(keep_minutes=10)
    for minute in range(100):
        d.add(KEY, minute * 60.0, prompt=minute)
    points = d.series(KEY, 0, 100)
    assert [p.minute for p in points] == list(range(90, 100))
    assert [p.prompt_tokens for p in points] == list(range(90, 100))
    d.add(KEY, 5 * 60.0, prompt=1)  # too old to keep: ignored, not wrapped onto minute 95
    assert d.series(KEY, 95, 96)[0].prompt_tokens == 95


def test_merge_adds_another_replicas_counts() -> None:
    a, b = Demand(), Demand()
    a.add(KEY, 60.0, prompt=10)
    b.add(KEY, 60.0, prompt=5)
    b.add(KEY, 120.0, prompt=1)
    a.merge(KEY, b.series(KEY, 0, 3))
    assert [p.prompt_tokens for p in a.series(KEY, 1, 3)] == [15, 1]


def test_keep_minutes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keep_minutes"):
        Demand(keep_minutes=0)


async def test_replicas_demand_adds_up_in_redis_and_a_failed_flush_is_kept(
    redis_url: str,  # noqa: F811
) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from gateway.state.demand import SharedDemand

    a_conn, b_conn = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    a, b = SharedDemand(a_conn, "t:"), SharedDemand(b_conn, "t:")
    a.add(KEY, 1000, 1, 100, 10)
    a.add(KEY, 1061, 2, 30, 3)  # the next hour's hash
    b.add(KEY, 1000, 1, 50, 5)
    await a.flush()
    await b.flush()
    got = await a.read(1000, 1062)
    assert got.series(KEY, 1000, 1001) == [Point(1000, 2, 150, 15)]
    assert got.series(KEY, 1061, 1062) == [Point(1061, 2, 30, 3)]
    await b_conn.aclose()
    b.redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
    b.add(KEY, 1001, 1, 1, 1)
    with pytest.raises(RedisError):
        await b.flush()
    assert b.pending[KEY] == {1001: [1, 1, 1]}  # kept for the next flush
    b.redis = aioredis.from_url(redis_url)
    await b.flush()
    assert (await a.read(1001, 1002)).series(KEY, 1001, 1002) == [Point(1001, 1, 1, 1)]
    await b.redis.aclose()
    await a_conn.aclose()


async def _chat_n(base: str, n: int) -> None:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=ACME, max_retries=0)
    for _ in range(n):
        await client.chat.completions.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    await client.close()


def _demand_config(**state: Any) -> dict[str, Any]:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}})
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    if state:
        cfg["state"] = state
    return cfg


async def _demand(http: aiohttp.ClientSession, base: str, query: str = "") -> Any:
    async with http.get(f"{base}/admin/demand{query}", headers=ADMIN_AUTH) as r:
        return r.status, await r.json()


async def test_admin_demand_counts_what_each_request_used(
    start_gateway: Any, http: aiohttp.ClientSession
) -> None:
    server, _ = await start_gateway(_demand_config())
    base = str(server.make_url("")).rstrip("/")
    await _chat_n(base, 3)
    status, view = await _demand(http, base, "?minutes=5")
    assert status == 200 and view["scope"] == "replica" and view["minutes"] == 5
    [series] = view["series"]
    assert (series["model"], series["region"], series["class"]) == (MODEL, "us-east",
                                                                    "interactive")  # fmt: skip
    assert sum(series["requests"]) == 3 and sum(series["output_tokens"]) == 15
    assert sum(series["prompt_tokens"]) > 0
    for bad in ("?minutes=0", "?minutes=abc", "?minutes=99999999"):
        status, err = await _demand(http, base, bad)
        assert status == 400 and err["error"]["param"] == "minutes"
    async with http.get(f"{base}/admin/demand") as r:
        assert r.status == 401


async def test_admin_demand_sums_every_replica_through_redis(
    start_gateway: Any,
    http: aiohttp.ClientSession,
    redis_url: str,  # noqa: F811
) -> None:
    cfg = _demand_config(backend="redis", redis_url=redis_url, sync_interval_s=0.05)
    bases = []
    for _ in range(2):
        server, _ = await start_gateway(cfg)
        bases.append(str(server.make_url("")).rstrip("/"))
    await _chat_n(bases[0], 2)
    await _chat_n(bases[1], 3)
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # each replica flushes its counts once a second
        _, view = await _demand(http, bases[0])
        if view["series"] and sum(view["series"][0]["requests"]) == 5:
            break
        assert asyncio.get_running_loop().time() < deadline, view
        await asyncio.sleep(0.2)
    assert view["scope"] == "replicas"


def test_demand_class_is_the_tenants_unless_its_application_says() -> None:
    from gateway.config.schema import ConfigError, parse

    raw = config_dict()
    raw["tenants"]["acme"]["demand_class"] = "batch"
    raw["tenants"]["globex"]["apps"]["chat"]["demand_class"] = "batch"
    cfg = parse(raw)
    assert cfg.tenants["acme"].apps["chat"].demand_class == "batch"
    assert cfg.tenants["globex"].demand_class == "interactive"
    assert cfg.tenants["globex"].apps["chat"].demand_class == "batch"
    raw["tenants"]["acme"]["demand_class"] = "bulk"
    with pytest.raises(ConfigError, match=r"tenants\.acme\.demand_class must be"):
        parse(raw)
