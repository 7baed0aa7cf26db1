"""The simulated engine: roofline step times, continuous batching, KV budget, vLLM surface."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from engines.perf_model import MODELS, PerfModel, SeqWork
from engines.sim.scheduler import Scheduler, Sequence
from tests.conftest import MODEL, scrape, start_sim


def test_decode_slows_with_batch_and_context() -> None:
    pm = PerfModel.named("H100", MODEL)
    assert pm.decode_step_time(64, 1000) > pm.decode_step_time(1, 1000)
    assert pm.decode_step_time(64, 8000) > pm.decode_step_time(64, 1000)
    # Small-batch decode is bound by reading the weights once: 16 GB at 80% of 3.35 TB/s.
    alone = pm.decode_step_time(1, 100) - pm.eff.step_overhead_s
    assert alone == pytest.approx(MODELS[MODEL].weight_bytes / (3.35e12 * 0.8), rel=0.02)
    # Large prefill chunks are bound by compute: 2 FLOPs per parameter per token at 60% MFU.
    chunk = pm.step_time([SeqWork(0, 2048)]) - pm.eff.step_overhead_s
    assert chunk == pytest.approx(2 * 8.03e9 * 2048 / (989e12 * 0.6), rel=0.1)
    assert PerfModel.named("A100", MODEL).decode_step_time(8, 500) > pm.decode_step_time(8, 500)


def test_kv_capacity_and_tensor_parallel() -> None:
    pm = PerfModel.named("H100", MODEL)
    # (80 GB * 0.9 - 16 GB weights - 2 GB) / 128 KiB per token
    assert pm.kv_capacity_tokens == int((72e9 - 16.06e9 - 2e9) // (2 * 32 * 8 * 128 * 2))
    assert PerfModel.named("H100", "llama-3.1-70b").kv_capacity_tokens == 0
    assert PerfModel.named("H100", "llama-3.1-70b", tp=4).kv_capacity_tokens > 0
    with pytest.raises(KeyError, match="unknown GPU"):
        PerfModel.named("V100", MODEL)


def test_chunked_prefill_respects_token_budget() -> None:
    s = Scheduler(kv_blocks=10_000, max_batched_tokens=512)
    s.add(Sequence("a", prompt_tokens=1200, target_output=3))
    s.add(Sequence("b", prompt_tokens=100, target_output=3))
    steps = []
    while s.has_work:
        plan = s.schedule()
        steps.append([(q.rid, n) for q, n in plan.items])
        s.complete(plan)
    assert steps[0] == [("a", 512)]
    assert steps[1] == [("a", 512)]
    assert steps[2] == [("a", 176), ("b", 100)]  # prefill of b shares the step
    assert steps[3] == [("a", 1), ("b", 1)]  # both decode together
    assert s.used_blocks == 0


def test_requests_wait_when_kv_is_full_and_decode_preempts() -> None:
    s = Scheduler(kv_blocks=8, block_size=16, max_batched_tokens=4096)
    a = Sequence("a", prompt_tokens=64, target_output=40)  # 4 blocks, grows to 7
    b = Sequence("b", prompt_tokens=64, target_output=40)
    c = Sequence("c", prompt_tokens=64, target_output=1)
    for q in (a, b, c):
        s.add(q)
    s.complete(s.schedule())
    assert [q.rid for q in s.running] == ["a", "b"]
    assert [q.rid for q in s.waiting] == ["c"]  # no room for a third prompt
    assert s.kv_usage == 1.0
    s.complete(s.schedule())  # a needs a fifth block: b, the newest, is preempted
    assert s.preemptions == 1
    assert [q.rid for q in s.running] == ["a"]
    assert b.computed == 0 and b.output == 1  # recompute keeps its output token
    while s.has_work:
        s.complete(s.schedule())
    assert a.output == b.output == 40 and c.output == 1
    assert s.used_blocks == 0


async def test_engine_surface_matches_vllm() -> None:
    runner, url = await start_sim(time_scale=0.01)
    try:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        forced = await client.completions.create(
            model=MODEL, prompt="x", max_tokens=33, extra_body={"ignore_eos": True}
        )
        assert forced.usage is not None and forced.usage.completion_tokens == 33
        assert forced.choices[0].finish_reason == "length"
        # Without ignore_eos the length is sampled (seeded per request) and at most max_tokens.
        lengths = []
        for seed in range(8):
            r = await client.completions.create(model=MODEL, prompt="x", max_tokens=400, seed=seed)
            assert r.usage is not None
            lengths.append(r.usage.completion_tokens)
        assert len(set(lengths)) > 1 and max(lengths) <= 400
        again = await client.completions.create(model=MODEL, prompt="x", max_tokens=400, seed=3)
        assert again.usage is not None and again.usage.completion_tokens == lengths[3]

        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt="x")

        async def busy() -> None:
            await client.completions.create(
                model=MODEL, prompt="y" * 400, max_tokens=300, extra_body={"ignore_eos": True}
            )

        tasks = [asyncio.create_task(busy()) for _ in range(4)]
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                await asyncio.sleep(0.01)
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
                if scrape(text, "vllm:num_requests_running") == 4:
                    break
            assert scrape(text, "vllm:kv_cache_usage_perc") > 0
            await asyncio.gather(*tasks)
            async with http.get(f"{url}/metrics") as resp:
                text = await resp.text()
        assert scrape(text, "vllm:num_requests_running") == 0
        assert scrape(text, "vllm:num_requests_waiting") == 0
        assert scrape(text, "vllm:generation_tokens_total") == 33 + sum(lengths) + lengths[3] + 1200
        assert scrape(text, "vllm:request_success_total", finished_reason="length") >= 5
        assert scrape(text, "vllm:prompt_tokens_total") > 400
    finally:
        await runner.cleanup()
