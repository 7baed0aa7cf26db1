"""The gate through the live gateway: throttling under overload, the fairness queue, its
limits, the admin view and the metrics, with the official OpenAI client."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from gateway.http.auth import digest
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, free_port, scrape

GLOBEX = "sk-test-globex-chat"
ADMIN = "sk-test-admin"
ENGINE = "us-east/llama-3.1-8b/0"  # fair_config's only engine


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll the gateway's state until `condition` holds; fail past the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def backlog(gw: Gateway, tenant: str = "acme") -> int:
    """Requests of `tenant` waiting in the fairness queue."""
    return gw.gate.dispatcher.policy(MODEL).backlog(tenant)


def saturated(gw: Gateway) -> bool:
    """The only slot is taken: the model is overloaded, so OIT may throttle."""
    return gw.gate.core.ledger.in_flight(ENGINE) == 1 and gw.gate.dispatcher.overloaded(MODEL)


def fair_config(policy: str = "wsc", max_running: int = 1, **fairness: Any) -> dict[str, Any]:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim", "max_running": max_running}]}})
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token: a 40-token request holds its slot ~0.3 s
    cfg["fairness"] = {"policy": policy, **fairness}
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    return cfg


def client_for(server: Any, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=key, max_retries=0, timeout=30
    )


async def chat(c: openai.AsyncOpenAI, tokens: int = 40, **kw: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=tokens,
        extra_body={"ignore_eos": True},
        **kw,
    )


async def finish_order(policy: str, start_gateway: GatewayFactory) -> list[str]:
    server, gw = await start_gateway(fair_config(policy))
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    order: list[str] = []

    async def one(c: openai.AsyncOpenAI, name: str) -> None:
        await chat(c)
        order.append(name)

    flood = [asyncio.create_task(one(acme, f"acme{i}")) for i in range(5)]
    await wait_for(lambda: saturated(gw) and backlog(gw) == 4)  # acme0 runs, four wait
    await asyncio.gather(one(globex, "globex"), *flood)
    return order


async def test_vtc_and_wsc_serve_a_newcomer_before_the_flood_fcfs_does_not(
    start_gateway: GatewayFactory,
) -> None:
    assert (await finish_order("fcfs", start_gateway))[-1] == "globex"
    for policy in ("vtc", "wsc"):
        order = await finish_order(policy, start_gateway)
        assert order.index("globex") <= 2, (policy, order)


async def test_continuing_interaction_jumps_the_queue(start_gateway: GatewayFactory) -> None:
    server, gw = await start_gateway(fair_config("wsc"))
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    await chat(globex, 2, extra_headers={"X-Fairway-Interaction": "task-7"})
    order: list[str] = []

    async def one(c: openai.AsyncOpenAI, name: str, **kw: Any) -> None:
        await chat(c, **kw)
        order.append(name)

    flood = [asyncio.create_task(one(acme, f"acme{i}")) for i in range(4)]
    await wait_for(lambda: saturated(gw) and backlog(gw) == 3)  # acme0 runs, three wait
    # The same interaction's next call, in the body's metadata this time.
    await asyncio.gather(one(globex, "step2", metadata={"interaction_id": "task-7"}), *flood)
    assert order.index("step2") <= 1, order


async def test_throttle_only_under_overload_with_retry_after(
    start_gateway: GatewayFactory,
) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=600, burst_tokens=20)
    server, gw = await start_gateway(cfg)
    acme = client_for(server, ACME)
    # Not overloaded: no throttling even beyond the bucket (the debt is remembered).
    for _ in range(3):
        raw = await chat(acme, 4)
        assert raw.headers["x-ratelimit-limit-tokens"] == "600"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 0
    assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
    globex = client_for(server, GLOBEX)
    hold = asyncio.create_task(chat(globex, 60))  # the only slot: the model is overloaded
    await wait_for(lambda: saturated(gw))
    with pytest.raises(openai.RateLimitError) as err:
        await chat(acme, 4)
    assert err.value.status_code == 429
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "rate_limit_exceeded"
    assert "overloaded" in body["message"] and "acme" in body["message"]
    retry = int(err.value.response.headers["Retry-After"])
    assert 1 <= retry <= 60
    assert err.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    await hold


async def test_interaction_in_progress_is_never_cut(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=600, burst_tokens=100)
    # Seven calls in all, within the application's calls per interaction (its opening call
    # must find room for them: 7 x ~12 tokens of the 100).
    cfg["tenants"]["acme"]["apps"]["chat"] = {"calls_per_interaction": 7,
                                              "expected_output_tokens": 4}  # fmt: skip
    server, gw = await start_gateway(cfg)
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    hdr = {"X-Fairway-Interaction": "agent-run-1"}
    await chat(acme, 4, extra_headers=hdr)  # opens the interaction while all is calm
    hold = asyncio.create_task(chat(globex, 60))  # the only slot: the model is overloaded
    await wait_for(lambda: saturated(gw))
    # Six more calls of the interaction, far beyond the bucket, during overload: all admitted.
    calls = [asyncio.create_task(chat(acme, 40, extra_headers=hdr)) for _ in range(6)]
    await wait_for(lambda: backlog(gw) == 6)  # admitted: all six wait for the slot
    with pytest.raises(openai.RateLimitError):  # a new interaction is not
        await chat(acme, 40, extra_headers={"X-Fairway-Interaction": "agent-run-2"})
    for raw in await asyncio.gather(*calls, hold):
        assert raw.http_response.status_code == 200
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_throttled_requests_total", tenant="acme") == 1


async def test_queue_limits_answer_429_and_503(start_gateway: GatewayFactory) -> None:
    server, gw = await start_gateway(
        fair_config("vtc", max_queue_per_tenant=1, queue_timeout_s=0.3)
    )
    acme = client_for(server, ACME)
    hold = asyncio.create_task(chat(acme, 100))  # ~0.8 s
    await wait_for(lambda: saturated(gw))
    waiting = asyncio.create_task(chat(acme, 4))
    await wait_for(lambda: backlog(gw) == 1)
    with pytest.raises(openai.RateLimitError) as full:
        await chat(acme, 4)
    assert isinstance(full.value.body, dict) and full.value.body["code"] == "queue_full"
    with pytest.raises(openai.InternalServerError) as late:
        await waiting
    assert late.value.status_code == 503
    assert isinstance(late.value.body, dict) and late.value.body["code"] == "queue_timeout"
    assert "saturated" in late.value.body["message"]
    assert late.value.response.headers["Retry-After"] == "1"
    await hold


async def test_client_that_leaves_the_queue_frees_its_place(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(fair_config("wsc"))
    acme = client_for(server, ACME)
    hold = asyncio.create_task(chat(acme, 60))
    await wait_for(lambda: saturated(gw))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    url = server.make_url("/v1/chat/completions")

    async def post() -> None:
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {ACME}"}):
            pass

    leaver = asyncio.create_task(post())
    await wait_for(lambda: backlog(gw) == 1)
    leaver.cancel()
    # The handler is cancelled when the server sees the socket close.
    await wait_for(lambda: backlog(gw) == 0)
    await hold
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_dropped_requests_total", reason="client_gone") == 1
    assert scrape(text, "fairway_queue_depth", tenant="acme") == 0
    assert scrape(text, "fairway_service_counter", tenant="acme") > 0
    assert gw.gate.core.ledger.in_flight("us-east/llama-3.1-8b/0") == 0
    assert gw.gate.core.ledger.total() == 0


async def test_admin_view_needs_the_admin_key(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=6000)
    cfg["tenants"]["acme"]["apps"]["chat"] = {
        "tokens_per_minute": 3000,
        "expected_output_tokens": 50,
    }
    server, _ = await start_gateway(cfg)
    await chat(client_for(server, ACME), 10)
    url = server.make_url("/admin/tenants")
    for headers in ({}, {"Authorization": f"Bearer {ACME}"}):
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert "error" in await resp.json()
    async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 200
        view = await resp.json()
    acme = view["tenants"]["acme"]
    assert view["policy"] == "wsc" and acme["weight"] == 1.0
    assert acme["bucket"]["tokens_per_minute"] == 6000 and acme["bucket"]["tokens"] < 6000
    assert acme["apps"]["chat"]["bucket"]["tokens"] < 3000
    assert acme["models"][MODEL]["counter"] > 0 and acme["models"][MODEL]["queued"] == 0
    assert view["tenants"]["globex"]["bucket"] is None


@pytest.fixture
async def redis_server(tmp_path: Any) -> Any:
    """A real redis-server on a free port (the set-up installs Debian's package)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(tmp_path), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    import redis.asyncio as aioredis

    try:
        r = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        deadline = asyncio.get_running_loop().time() + 5.0
        while True:  # until it answers a ping
            try:
                await r.ping()
                break
            except Exception:
                assert asyncio.get_running_loop().time() < deadline, "redis-server did not start"
                await asyncio.sleep(0.02)
        await r.aclose()
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        proc.terminate()
        await proc.wait()


@pytest.fixture
def redis_url(redis_server: tuple[str, Any]) -> str:
    return redis_server[0]


async def test_two_replicas_share_one_limit_through_redis(
    start_gateway: GatewayFactory, redis_url: str
) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=60, burst_tokens=60)  # one token a second
    cfg["state"] = {"backend": "redis", "redis_url": redis_url}
    (s1, g1), (s2, g2) = await start_gateway(cfg), await start_gateway(cfg)
    holds = [asyncio.create_task(chat(client_for(s, GLOBEX), 60)) for s in (s1, s2)]
    await wait_for(lambda: saturated(g1) and saturated(g2))  # both replicas are overloaded
    # ~12 tokens each, alternating replicas: one bucket of 60 between them admits five.
    calls = [chat(client_for((s1, s2)[i % 2], ACME), 4) for i in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    throttled = sum(isinstance(r, openai.RateLimitError) for r in results)
    assert throttled == 3, results  # with a bucket per replica, none would be
    await asyncio.gather(*holds)


async def test_unreachable_redis_serves_on_local_buckets(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=600)
    cfg["state"] = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    server, _ = await start_gateway(cfg)
    for _ in range(4):
        raw = await chat(client_for(server, ACME), 4)
        assert raw.http_response.status_code == 200
    assert "x-ratelimit-limit-tokens" in raw.headers  # this replica's own bucket
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_state_backend_up") == 0  # the breaker opened


async def test_a_slow_redis_costs_a_bounded_delay_and_is_paid_back(
    start_gateway: GatewayFactory, redis_server: tuple[str, Any], http: aiohttp.ClientSession
) -> None:
    url, proc = redis_server
    cfg = fair_config("wsc", max_running=8)
    cfg["tenants"]["acme"].update(tokens_per_minute=6, burst_tokens=100_000)  # ~no refill
    cfg["state"] = {"backend": "redis", "redis_url": url, "timeout_s": 0.2, "open_after": 2,
                    "probe_interval_s": 0.1}  # fmt: skip
    server, gw = await start_gateway(cfg)
    acme = client_for(server, ACME)
    store = gw.gate.store
    keys = [("acme", next(lim for k, lim in _keys(gw) if k == "acme"))]
    await chat(acme, 4)
    (before,) = await store.levels(keys)
    proc.send_signal(signal.SIGSTOP)  # Redis hangs: every call times out
    try:
        loop = asyncio.get_running_loop()
        took = []
        for _ in range(6):
            t0 = loop.time()
            raw = await chat(acme, 4)
            took.append(loop.time() - t0)
            assert raw.http_response.status_code == 200
        # Two calls wait out the timeout (admission, then settling) before the breaker opens;
        # after that nothing waits for Redis.
        assert max(took) < 1.5, took
        assert sum(took[3:]) < 0.5 * sum(took[:2]) + 0.3, took
        text = await (await http.get(server.make_url("/metrics"))).text()
        assert scrape(text, "fairway_state_backend_up") == 0
        owed = sum(t for _, t in store.owed.values())
        assert owed > 0
    finally:
        proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: store.up, within=10)
    (after,) = await store.levels(keys)
    # What was charged during the outage reached Redis once: neither forgiven nor doubled.
    assert abs((before - after) - owed) < 2.0 + 0.1 * owed / 100, (before, after, owed)
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_state_backend_up") == 1


def _keys(gw: Any) -> Any:
    from gateway.core.admission import bucket_keys

    tenant = gw.cfg.tenants["acme"]
    return bucket_keys(tenant, tenant.apps["chat"])


async def test_a_refused_first_call_opens_no_interaction(start_gateway: GatewayFactory) -> None:
    cfg = fair_config("wsc")
    cfg["tenants"]["acme"].update(tokens_per_minute=600, burst_tokens=20)
    server, gw = await start_gateway(cfg)
    acme, globex = client_for(server, ACME), client_for(server, GLOBEX)
    await chat(acme, 16)  # empties the bucket while all is calm
    hold = asyncio.create_task(chat(globex, 60))
    await wait_for(lambda: saturated(gw))
    hdr = {"X-Fairway-Interaction": "fresh-task"}
    for _ in range(2):  # retrying the refused opening call does not make it a continuation
        with pytest.raises(openai.RateLimitError):
            await chat(acme, 4, extra_headers=hdr)
    await hold
