"""Hard limits (`limits` of a tenant or an application) through live gateways and the official
OpenAI client: enforced always, refused with 429 and OpenAI's headers, nothing kept by a request
that ends however it ends; and with one real redis-server, one global limit for three replicas
in front of the same simulated engines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.schema import ConfigError, parse
from gateway.http.state import Gateway
from gateway.state.buckets import MemoryStore, RedisStore
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, start_sim
from tests.test_gate import client_for, fair_config, redis_server, redis_url, wait_for  # noqa: F401

GLOBEX = "sk-test-globex-chat"
REPLICAS = 3


async def chat(c: openai.AsyncOpenAI, tokens: int = 4, **kw: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=tokens,
        extra_body={"ignore_eos": True},
        **kw,
    )


def held(gw: Gateway) -> dict[str, int]:
    """Concurrency slots the gateway's store counts as taken by its requests."""
    store = gw.gate.store
    assert isinstance(store, MemoryStore | RedisStore)
    return store.held


def test_limits_validate_like_every_table() -> None:
    cfg = config_dict()
    cfg["tenants"]["acme"]["limits"] = {"tokens_per_minute": 600, "max_concurrent": 4}
    cfg["tenants"]["acme"]["apps"]["chat"] = {"limits": {"requests_per_minute": 60,
                                                         "burst_requests": 5}}  # fmt: skip
    acme = parse(cfg).tenants["acme"]
    assert acme.limits.tokens_per_minute == 600 and acme.limits.burst_tokens == 600  # default
    assert acme.limits.max_concurrent == 4 and acme.limits.requests_per_minute == 0
    assert acme.apps["chat"].limits.burst_requests == 5
    assert parse(config_dict()).tenants["acme"].limits.max_concurrent == 0  # no limit
    for where, table, message in [
        ("tenant", {"tokens_per_minut": 1}, "tenants.acme.limits.tokens_per_minut is not a known"),
        ("tenant", {"max_concurrent": -1}, "tenants.acme.limits.max_concurrent must be >= 0"),
        ("app", {"max_concurrent": 1.5}, "tenants.acme.apps.chat.limits.max_concurrent must be"),
        ("app", {"requests_per_minute": "9"}, "tenants.acme.apps.chat.limits.requests_per_minute"),
    ]:
        bad = config_dict()
        target = (
            bad["tenants"]["acme"] if where == "tenant" else bad["tenants"]["acme"]["apps"]["chat"]
        )
        target["limits"] = table
        with pytest.raises(ConfigError) as err:
            parse(bad)
        assert message in str(err.value), str(err.value)


async def test_requests_per_minute_hold_without_overload_and_name_the_limit(
    start_gateway: GatewayFactory,
) -> None:
    cfg = config_dict()
    cfg["tenants"]["acme"]["limits"] = {"requests_per_minute": 30, "burst_requests": 3}
    server, gw = await start_gateway(cfg)
    acme = client_for(server, ACME)
    remaining = []
    for _ in range(3):
        raw = await chat(acme)
        assert raw.headers["x-ratelimit-limit-requests"] == "30"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-reset-requests"][-1] == "s"
    assert remaining == [2, 1, 0]
    assert not gw.gate.dispatcher.overloaded(MODEL)  # the soft buckets would let it through
    with pytest.raises(openai.RateLimitError) as err:
        await chat(acme)
    body, headers = err.value.body, err.value.response.headers
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert "tenants.acme.limits.requests_per_minute" in body["message"]
    assert body["type"] and "param" in body
    assert 1 <= int(headers["Retry-After"]) <= 2  # one request refills in 2 s
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert (await chat(client_for(server, GLOBEX))).http_response.status_code == 200
    await asyncio.sleep(2.0)
    assert (await chat(acme)).http_response.status_code == 200


async def test_tokens_per_minute_of_an_application_are_settled_with_real_usage(
    start_gateway: GatewayFactory,
) -> None:
    cfg = config_dict()
    cfg["tenants"]["acme"]["apps"]["chat"] = {
        "expected_output_tokens": 200,
        "limits": {"tokens_per_minute": 60, "burst_tokens": 100},  # one token a second
    }
    server, _ = await start_gateway(cfg)
    acme = client_for(server, ACME)
    first = await chat(acme, 40)
    assert first.headers["x-ratelimit-limit-tokens"] == "60"
    used = first.parse().usage.total_tokens
    second = await chat(acme, 4)  # charged on the estimate, settled with what the first used
    left = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 100 - used - 4 - 20 <= left <= 100 - used, (used, left)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(acme, 80)  # more than is left, never more than the burst
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert "tenants.acme.apps.chat.limits.tokens_per_minute" in body["message"]
    assert "application 'chat'" in body["message"]
    assert int(err.value.response.headers["Retry-After"]) >= 2


async def test_max_concurrent_counts_queued_and_running_and_nothing_leaks(
    start_gateway: GatewayFactory,
) -> None:
    cfg = fair_config("wsc", max_running=1, queue_timeout_s=0.5)
    cfg["tenants"]["acme"]["limits"] = {"max_concurrent": 2, "requests_per_minute": 1,
                                        "burst_requests": 100}  # ~no refill  # fmt: skip
    server, gw = await start_gateway(cfg)
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    running = asyncio.create_task(chat(acme, 200))  # ~1.6 s on the only slot
    await wait_for(lambda: gw.gate.core.ledger.total() == 1)
    queued = asyncio.create_task(chat(acme, 4))  # waits: under way as well
    await wait_for(lambda: sum(held(gw).values()) == 2)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(acme)
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "concurrency_limit"
    assert "tenants.acme.limits.max_concurrent" in body["message"]
    assert err.value.response.headers["Retry-After"] == "1"
    with pytest.raises(openai.InternalServerError):  # timed out in the queue: gives back
        await queued
    assert sum(held(gw).values()) == 1
    rpm = gw.gate.store
    (level,) = await rpm.levels([k for k in _limit_keys(gw) if k[0] == "acme#requests"])
    # The running one only: the queued one got its request back, the refused took none.
    assert level == pytest.approx(99, abs=0.1)
    running.cancel()  # the client goes away mid-request
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await wait_for(lambda: not held(gw))
    assert (await chat(globex)).http_response.status_code == 200
    first, second = await asyncio.gather(chat(acme), chat(acme))
    assert first.http_response.status_code == second.http_response.status_code == 200
    assert not held(gw)


def _limit_keys(gw: Gateway) -> Any:
    from gateway.core.admission import limit_keys

    tenant = gw.cfg.tenants["acme"]
    return limit_keys(tenant, tenant.apps["chat"])


# --- Three replicas, one Redis, the same engines.


@contextlib.asynccontextmanager
async def replicas(
    start_gateway: GatewayFactory, redis: str, limits: dict[str, Any], time_scale: float,
    slots: int = 64, lease_s: float | None = None,
) -> AsyncIterator[list[tuple[TestServer, Gateway]]]:  # fmt: skip
    """Three in-process gateways sharing `redis`, in front of one simulated engine."""
    runner, url = await start_sim(max_num_seqs=slots, time_scale=time_scale)
    try:
        cfg = config_dict({"us-east": {MODEL: [
            {"kind": "vllm", "url": url, "max_running": slots, "max_kv_tokens": 0}]}})  # fmt: skip
        cfg["state"] = {"backend": "redis", "redis_url": redis, "sync_interval_s": 0.05}
        for name, table in limits.items():
            cfg["tenants"][name]["limits"] = table
        out = [await start_gateway(cfg) for _ in range(REPLICAS)]
        for _, gw in out:
            await wait_for(lambda gw=gw: all(e.routable for e in gw.registry.engines.values()))
        yield out
    finally:
        await runner.cleanup()


async def flood(
    servers: list[TestServer], key: str, spread: list[int], seconds: float, refill_s: float
) -> tuple[float, float, tuple[float, float], int]:
    """Clients sending back to back (`spread[i]` of them at replica i) for `seconds`; returns
    the tokens and requests admitted, bounds on the seconds from the first admission to the
    last (each request was admitted between its sending and its answer: the window is at
    least the last sending less the first answer, at most the last answer less the first
    sending), and the 429s. Each client sends one request first (connected and warm, every
    request then takes about as long to reach the gate), then waits `refill_s` for the bucket
    to be full again."""
    loop = asyncio.get_running_loop()
    clients = [client_for(servers[i], key) for i, n in enumerate(spread) for _ in range(n)]
    await asyncio.gather(*(chat(c, 4) for c in clients))
    await asyncio.sleep(refill_s)
    tokens, requests, refused = [0.0], [0.0], [0]
    sent: list[float] = []
    answered: list[float] = []
    codes: set[str | None] = set()
    until = loop.time() + seconds

    async def one(c: openai.AsyncOpenAI) -> None:
        while loop.time() < until:
            t0 = loop.time()
            try:
                raw = await chat(c, 4)
            except openai.RateLimitError as exc:
                codes.add(exc.body["code"] if isinstance(exc.body, dict) else None)
                refused[0] += 1
                await asyncio.sleep(int(exc.response.headers["retry-after-ms"]) / 1000)
                continue
            usage = raw.parse().usage
            tokens[0] += usage.prompt_tokens + usage.completion_tokens
            requests[0] += 1
            sent.append(t0)
            answered.append(loop.time())

    await asyncio.gather(*(one(c) for c in clients))
    for c in clients:
        await c.close()
    assert codes <= {"rate_limit_exceeded"}, codes
    window = (max(sent) - min(answered), max(answered) - min(sent))
    return tokens[0], requests[0], window, refused[0]


@pytest.mark.timeout(120)
async def test_three_replicas_admit_one_global_tokens_and_requests_per_minute(
    start_gateway: GatewayFactory,
    redis_url: str,  # noqa: F811
) -> None:
    tpm, tburst = 30_000.0, 400.0  # 500 tokens a second
    rpm, rburst = 1_800.0, 10.0  # 30 requests a second
    seconds = 5.0
    limits = {
        "acme": {"tokens_per_minute": tpm, "burst_tokens": tburst},
        "globex": {"requests_per_minute": rpm, "burst_requests": rburst},
    }
    async with replicas(start_gateway, redis_url, limits, time_scale=0.02) as reps:
        servers = [s for s, _ in reps]
        # acme spread evenly, globex nearly all at one replica.
        (tokens, _, t_window, t_refused), (_, requests, r_window, r_refused) = await asyncio.gather(
            flood(servers, ACME, [3, 3, 3], seconds, refill_s=1.5),  # 0.8 s to refill
            flood(servers, GLOBEX, [6, 0, 2], seconds, refill_s=1.5),  # 0.33 s
        )
    assert t_window[0] > seconds - 0.5 and r_window[0] > seconds - 0.5
    assert t_refused > 0 and r_refused > 0  # the clients flooded past the limits
    # At most 1% over one burst plus the rate over the window, wherever in its bounds it lies:
    # the limit holds across replicas. The floor is looser (5% under): a bucket refills to
    # its burst within a second here (0.8 s, 0.33 s), and whatever it would gain past that
    # while every client still sleeps on its Retry-After (late on a loaded machine) is lost to
    # the clients, not refused by the limiter.
    low, high = (tburst + tpm * w / 60 for w in t_window)
    assert 0.95 * low <= tokens <= 1.01 * high, (tokens, low, high)
    low, high = (rburst + rpm * w / 60 for w in r_window)
    assert 0.95 * low <= requests <= 1.01 * high, (requests, low, high)


@pytest.mark.timeout(60)
async def test_max_concurrent_is_global_across_replicas_and_released(
    start_gateway: GatewayFactory,
    redis_server: tuple[str, Any],  # noqa: F811
) -> None:
    url, _ = redis_server
    async with replicas(start_gateway, url, {"acme": {"max_concurrent": 3}},
                        time_scale=1.0) as reps:  # fmt: skip
        clients = [client_for(s, ACME) for s, _ in reps]

        async def burst() -> list[Any]:
            calls = [chat(clients[i % REPLICAS], 100) for i in range(3 * REPLICAS)]  # ~0.8 s
            return await asyncio.gather(*calls, return_exceptions=True)

        for _ in range(2):  # and again once they have ended: the slots came back
            results = await burst()
            ok = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, openai.RateLimitError)]
            assert len(ok) == 3 and len(refused) == 3 * REPLICAS - 3, results
            assert all(isinstance(r.body, dict) and r.body["code"] == "concurrency_limit"
                       for r in refused)  # fmt: skip
        assert all(not held(gw) for _, gw in reps)
        import redis.asyncio as aioredis

        r = aioredis.from_url(url)
        try:
            counts = await r.hgetall("fairway:conc:acme#concurrent")
            assert sum(int(v) for v in counts.values()) == 0, counts
        finally:
            await r.aclose()


@pytest.mark.timeout(60)
async def test_a_replica_that_dies_holds_no_slot_past_its_lease(
    start_gateway: GatewayFactory,
    redis_url: str,  # noqa: F811
) -> None:
    async with replicas(start_gateway, redis_url, {"acme": {"max_concurrent": 2}},
                        time_scale=0.02) as reps:  # fmt: skip
        (server, gw), *_ = reps
        keys = [k for k in _limit_keys(gw) if k[0] == "acme#concurrent"]
        # Another replica takes both slots, then dies without giving them back.
        doomed = RedisStore(redis_url, lease_s=1.0)
        for _ in range(2):
            assert (await doomed.admit(keys, 0.0, 0.0, False)).admitted
        assert doomed._beat is not None
        doomed._beat.cancel()
        await doomed.redis.aclose()
        loop = asyncio.get_running_loop()
        died = loop.time()
        acme = client_for(server, ACME)
        with pytest.raises(openai.RateLimitError):
            await chat(acme)
        while True:
            try:
                raw = await chat(acme)
                break
            except openai.RateLimitError:
                assert loop.time() - died < 5.0, "the dead replica's slots never came back"
                await asyncio.sleep(0.1)
        assert raw.http_response.status_code == 200
        assert loop.time() - died >= 0.5  # not before its lease ran out
