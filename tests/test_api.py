"""The OpenAI client against the gateway: chat and completions, streaming and not."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
from aiohttp.test_utils import TestServer

from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, scrape

Served = tuple[TestServer, Gateway]
AUTH = {"Authorization": f"Bearer {ACME}"}


async def test_chat_whole(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=12,
        extra_body={"ignore_eos": True},
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    assert len(resp.choices[0].message.content.split()) == 12


async def test_chat_stream_counts_tokens(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
    assert usage is not None
    assert usage.completion_tokens == 20
    assert len("".join(text).split()) == 20


async def test_completions_whole_and_stream(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.usage is not None
    assert 1 <= resp.usage.completion_tokens <= 5
    stream = await client.completions.create(
        model=MODEL,
        prompt=[1, 2, 3, 4],
        max_tokens=7,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices).count(" ") == 7
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_usage_hidden_when_client_did_not_ask(
    gateway: Served, http: aiohttp.ClientSession
) -> None:
    server, _gw = gateway
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 6,
        "stream": True,
        "ignore_eos": True,
    }
    async with http.post(server.make_url("/v1/chat/completions"), json=body, headers=AUTH) as r:
        assert r.status == 200
        raw = await r.read()
    assert b'"usage"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")
    # ...yet the gateway recorded the real count from the usage chunk it asked for.
    async with http.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert scrape(text, "fairway_completion_tokens_total", tenant="acme", model=MODEL) == 6


async def test_models_health_and_metrics(
    client: openai.AsyncOpenAI, gateway: Served, http: aiohttp.ClientSession
) -> None:
    server, _ = gateway
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == ["llama-3.1-8b", "mistral-7b"]
    async with http.get(server.make_url("/healthz")) as r:
        assert r.status == 200
        assert (await r.json())["healthy_engines"] == {MODEL: 3, "mistral-7b": 1}
    await client.chat.completions.create(
        model="mistral-7b", messages=[{"role": "user", "content": "hello there"}], max_tokens=3
    )
    async with http.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert (
        scrape(text, "fairway_requests_total", tenant="acme", model="mistral-7b", status="200") == 1
    )
    assert scrape(text, "fairway_prompt_tokens_total", tenant="acme", model="mistral-7b") > 0
    assert scrape(text, "fairway_request_latency_seconds_count", tenant="acme") == 1


async def test_requests_spread_over_engines(start_gateway: GatewayFactory) -> None:
    import asyncio

    from tests.conftest import config_dict

    cfg = config_dict()
    cfg["routing"] = {"policy": "least-outstanding"}
    server, _ = await start_gateway(cfg)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0)

    async def one() -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": "q"}],
            max_tokens=30,
            extra_body={"ignore_eos": True},
        )
        return raw.headers["x-fairway-engine"]

    engines = await asyncio.gather(*(one() for _ in range(9)))
    # Least outstanding requests: nine concurrent requests over three engines, three each.
    assert sorted(engines.count(e) for e in set(engines)) == [3, 3, 3]


async def test_client_key_is_not_forwarded(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """An engine with its own key accepts the gateway's calls; the client's key never reaches it."""
    from gateway.config.schema import parse
    from tests.conftest import config_dict, start_sim

    runner, url = await start_sim(api_key="engine-secret")
    try:
        keyed = {"kind": "vllm", "url": url, "api_key": "engine-secret"}
        raw = config_dict({"us-east": {MODEL: [keyed]}, "eu-west": {MODEL: [{"kind": "sim"}]}})
        cfg = parse(raw)
        assert [(e.id, e.kind, e.api_key) for e in cfg.engines] == [
            ("us-east/llama-3.1-8b/0", "vllm", "engine-secret"),
            ("eu-west/llama-3.1-8b/0", "sim", None),
        ]
        assert sorted(cfg.tenants) == ["acme", "globex"]
        server, _gw = await start_gateway(raw)
        client = openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0, timeout=30
        )
        msgs: Any = [{"role": "user", "content": "x"}]
        for _ in range(3):
            resp = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=msgs, max_tokens=2,
                extra_headers={"X-Fairway-Regions": "us-east"},
            )  # fmt: skip
            assert resp.headers["x-fairway-engine"] == "us-east/llama-3.1-8b/0"
            usage = resp.parse().usage
            assert usage is not None and usage.completion_tokens >= 1
        # The keyed engine itself counts the three requests as served...
        async with http.get(f"{url}/metrics") as r:
            text = await r.text()
        assert scrape(text, "vllm:request_success_total") == 3
        # ...and refuses the client's key, or none: the gateway must have sent its own.
        body = {"model": MODEL, "messages": msgs, "max_tokens": 2}
        for headers in (AUTH, {}):
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 401
                assert orjson.loads(await r.read())["error"]["code"] == "invalid_api_key"
        async with http.get(f"{url}/metrics") as r:
            assert scrape(await r.text(), "vllm:request_success_total") == 3
    finally:
        await runner.cleanup()


async def test_suite_runs_on_uvloop() -> None:
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
