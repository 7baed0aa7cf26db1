"""Three gateway replicas, one real redis-server, the same simulated engines: one weighted
fairness, and engines not filled once per replica."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis

from gateway.core.fair_queue import Ticket
from gateway.core.fairness import Vtc
from gateway.core.ledger import EngineLimit, EngineLoad
from gateway.http.auth import digest
from gateway.state.cluster import ClusterSync
from tests.conftest import KEYS, MODEL, config_dict, free_port, scrape, start_sim
from tests.serving import serving
from tests.test_gate import redis_server, redis_url  # noqa: F401  (fixtures)

GLOBEX = "sk-test-globex-chat"
ACME = "sk-test-acme-chat"
ADMIN = "sk-test-admin"
PROMPT = "fair " * 120
SLOTS = 4  # per engine, in the engines and in the gateway's limits


def replica_config(redis: str, engines: list[str]) -> dict[str, Any]:
    cfg = config_dict({"us-east": {MODEL: [
        {"kind": "vllm", "url": url, "max_running": SLOTS, "max_kv_tokens": 0} for url in engines
    ]}})  # fmt: skip
    cfg["tenants"]["globex"]["weight"] = 2.0
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    cfg["state"] = {"backend": "redis", "redis_url": redis, "sync_interval_s": 0.05}
    cfg["fairness"] = {"queue_timeout_s": 120.0}
    return cfg


async def flood(
    base: str, key: str, service: list[float], until: float, since: float, n: int
) -> None:
    """`n` clients sending back to back until `until`; adds the service (prompt + 2 x output
    tokens, the fairness prices) of requests that finished after `since`."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    loop = asyncio.get_running_loop()

    async def one() -> None:
        while loop.time() < until:
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48,
                                                extra_body={"ignore_eos": True})  # fmt: skip
            assert r.usage is not None
            if loop.time() > since:
                service[0] += r.usage.prompt_tokens + 2 * r.usage.completion_tokens

    try:
        await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_three_replicas_give_two_tenants_of_weights_one_and_two_service_one_to_two(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert set(KEYS) == {ACME, GLOBEX}
    sims = [await start_sim(max_num_seqs=SLOTS, time_scale=0.4) for _ in range(2)]
    try:
        cfg = replica_config(redis_url, [url for _, url in sims])
        # History: acme was served a great deal while nobody contended. That earns no
        # penalty now: acme is rebased to a bounded lead once both tenants wait.
        r = aioredis.from_url(redis_url)
        await r.hset(f"fairway:fair:{MODEL}:served", "acme", "1e7")
        await r.aclose()
        async with contextlib.AsyncExitStack() as stack:
            bases = []
            for i in range(3):
                (tmp_path / f"r{i}").mkdir()
                _, base, _ = await stack.enter_async_context(serving(cfg, tmp_path / f"r{i}"))
                bases.append(base)
            loop = asyncio.get_running_loop()
            start = loop.time()
            since, until = start + 6.0, start + 22.0
            acme, globex = [0.0], [0.0]
            # acme (weight 1) floods replicas 0 and 1; globex (weight 2) replica 2 alone. Each
            # replica deciding alone would give acme twice globex's service, not half.
            await asyncio.gather(
                flood(bases[0], ACME, acme, until, since, 8),
                flood(bases[1], ACME, acme, until, since, 8),
                flood(bases[2], GLOBEX, globex, until, since, 16),
            )
            ratio = globex[0] / acme[0]
            assert 1.9 <= ratio <= 2.1, f"globex/acme service {ratio:.3f}, want 2 within 5%"

            async with aiohttp.ClientSession() as http:
                auth = {"Authorization": f"Bearer {ADMIN}"}
                async with http.get(f"{bases[0]}/admin/tenants", headers=auth) as r:
                    view = await r.json()
                # Replica 0 never saw globex, but orders tenants by globex's shared counter.
                assert view["tenants"]["globex"]["models"][MODEL]["counter"] > 0
                async with http.get(f"{bases[1]}/metrics") as r:
                    assert scrape(await r.text(), "fairway_replicas") == 3
    finally:
        for runner, _ in sims:
            await runner.cleanup()


@pytest.mark.timeout(60)
async def test_replicas_together_keep_each_engine_within_its_limit(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With its in-flight limit counted over all replicas, the engine runs no more than its
    slots (each replica alone would send it SLOTS; in the first instant of a flood, before the
    replicas have heard of each other's load, all three do)."""
    runner, url = await start_sim(max_num_seqs=64, time_scale=0.4)
    try:
        cfg = replica_config(redis_url, [url])
        async with contextlib.AsyncExitStack() as stack:
            bases = []
            for i in range(3):
                (tmp_path / f"r{i}").mkdir()
                _, base, _ = await stack.enter_async_context(serving(cfg, tmp_path / f"r{i}"))
                bases.append(base)
            loop = asyncio.get_running_loop()
            settled, until = loop.time() + 2.0, loop.time() + 8.0
            peak = [0.0]

            async def watch() -> None:
                await asyncio.sleep(settled - loop.time())
                async with aiohttp.ClientSession() as http:
                    while loop.time() < until:
                        async with http.get(f"{url}/metrics") as r:
                            text = await r.text()
                        running = scrape(text, "vllm:num_requests_running")
                        peak[0] = max(peak[0], running + scrape(text, "vllm:num_requests_waiting"))
                        await asyncio.sleep(0.02)

            sink = [0.0]
            await asyncio.gather(
                watch(),
                *(flood(b, ACME, sink, until, 0.0, 8) for b in bases),
            )
            # Each replica fills its share (2, 1 and 1 of the 4 slots) and no more while the
            # others wait; one slot of slack for a request that has left a replica's ledger
            # but not yet the engine's gauges.
            assert SLOTS <= peak[0] <= SLOTS + 1, peak[0]
    finally:
        await runner.cleanup()


def _sync(url: str, policy: Vtc, loads: dict[str, EngineLoad], polled: list[str]) -> ClusterSync:
    return ClusterSync(url, "t:", models=lambda: [MODEL], policy=lambda m: policy,
                       loads=lambda: loads, engines_of=lambda m: list(loads),
                       poll=polled.append, interval_s=0.05)  # fmt: skip


def _ticket(tenant: str, weight: float = 1.0) -> Ticket:
    return Ticket("r", tenant, "chat", 100, 50, 0.0, weight, unit_cost=150.0)


async def test_counters_add_up_across_replicas_and_a_lift_counts_once(
    redis_url: str,  # noqa: F811
) -> None:
    a, b = Vtc(), Vtc()
    la = {"e0": EngineLoad(EngineLimit(max_running=4))}
    lb = {"e0": EngineLoad(EngineLimit(max_running=4))}
    pa: list[str] = []
    sa, sb = _sync(redis_url, a, la, pa), _sync(redis_url, b, lb, [])
    try:
        t = _ticket("acme")
        a.charge_admission(t, 0.0)  # 100 prompt tokens at price 1
        a.on_tokens(t, 10)  # 10 output tokens at price 2
        b.charge_admission(_ticket("acme"), 0.0)
        await sa.sync(MODEL)
        await sb.sync(MODEL)
        await sa.sync(MODEL)
        assert a.served["acme"] == b.served["acme"] == 220.0
        assert pa == [MODEL, MODEL]  # each sync lets the gate start what may start now
        # acme waits at a; then globex comes to both: both lift it to the counter of the
        # waiting acme, 220, and Redis keeps 220 (a maximum, not a sum of two lifts). Each
        # sees the tenants waiting at the other, and the other's in-flight load.
        a.enqueue(_ticket("acme"), 0.0)
        la["e0"].requests = 3
        await sa.sync(MODEL)
        await sb.sync(MODEL)
        assert b.remote == frozenset({"acme"})
        a.enqueue(_ticket("globex"), 0.0)
        b.enqueue(_ticket("globex"), 0.0)
        await sa.sync(MODEL)
        await sb.sync(MODEL)
        await sa.sync(MODEL)
        assert a.served["globex"] == b.served["globex"] == 220.0
        assert a.remote == frozenset({"globex"}) and b.remote == frozenset({"acme", "globex"})
        assert lb["e0"].others == 3 and la["e0"].others == 2  # b's share while it waits
        assert {la["e0"].guaranteed, lb["e0"].guaranteed} == {2}
    finally:
        await sa.close()
        await sb.close()


async def test_a_tenant_ahead_of_one_waiting_elsewhere_waits_for_it() -> None:
    p = Vtc()
    p.served = {"acme": 1000.0, "globex": 100.0}
    p.enqueue(_ticket("acme"), 0.0)
    assert p.pop_next(0.0) is not None  # nobody waits elsewhere
    p.enqueue(_ticket("acme"), 0.0)
    p.remote = frozenset({"globex"})
    assert not p.may_start("acme", 0.0) and p.pop_next(0.0) is None
    p.served["globex"] = 1000.0 - 2 * 150.0  # within hold_slack typical requests
    assert p.may_start("acme", 0.0) and p.pop_next(0.0) is not None


async def test_a_replica_that_cannot_reach_redis_decides_alone() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    p = Vtc()
    loads = {"e0": EngineLoad(EngineLimit(max_running=4), others=3, guaranteed=1)}
    p.remote = frozenset({"globex"})
    s = _sync(url, p, loads, [])
    s.stale_s = 0.2
    task = asyncio.create_task(s.run())
    try:
        await asyncio.sleep(1.0)
        assert s.alone and p.remote == frozenset() and loads["e0"].others == 0
        assert loads["e0"].guaranteed == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await s.close()


def test_a_lead_earned_while_nobody_contended_is_cut_to_a_bound() -> None:
    p = Vtc()
    p.served = {"acme": 1e6, "globex": 10.0}
    p.enqueue(_ticket("acme"), 0.0)
    p.rebase()  # nobody waits elsewhere: nothing to compare with
    assert p.served["acme"] == 1e6
    p.remote = frozenset({"globex"})
    p.rebase()
    assert p.served["acme"] == 10.0 + p.lead_cap * 150.0
    assert p.take_marks() == {"acme": ("min", p.served["acme"])}
