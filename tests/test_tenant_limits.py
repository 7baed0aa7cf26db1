"""Per-tenant holds through the live gateway: `max_concurrent` and `max_body_bytes_in_flight`
answer 429 with Retry-After, another tenant is unaffected, and the counts come back to zero
however a request ends."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.schema import ConfigError, parse
from gateway.http.auth import digest
from gateway.http.holds import Holds, holds_of
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, scrape
from tests.test_errors import assert_openai_error
from tests.test_gate import client_for, wait_for

GLOBEX = "sk-test-globex-chat"
ADMIN = "sk-test-admin"
CHAT = "/v1/chat/completions"


def limits_config(max_running: int = 8, **acme: Any) -> dict[str, Any]:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim", "max_running": max_running}]}})
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token: a 2000-token request holds for ~16 s
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    cfg["tenants"]["acme"].update(acme)
    return cfg


def holds(gw: Gateway) -> Holds:
    return holds_of(gw.gate)


def chat_body(tokens: int, stream: bool = False, pad: int = 0) -> bytes:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello" + " " * pad}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    return orjson.dumps(body)


async def long_post(server: TestServer, key: str = ACME, stream: bool = False) -> None:
    """A request that holds for long (the caller cancels it: the client goes away)."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.make_url(CHAT),
            data=chat_body(2000, stream),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as r,
    ):
        async for _ in r.content.iter_any():
            pass


async def short_chat(c: openai.AsyncOpenAI) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )


async def admin_view(server: TestServer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            server.make_url("/admin/tenants"), headers={"Authorization": f"Bearer {ADMIN}"}
        ) as r,
    ):
        assert r.status == 200
        view: dict[str, Any] = (await r.json())["tenants"]
        return view


async def cancel(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def released(gw: Gateway) -> bool:
    h = holds(gw)
    return not h.requests and not h.body_bytes


async def test_over_max_concurrent_is_429_and_another_tenant_is_unaffected(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway(limits_config(max_running=1, max_concurrent=2))
    running = asyncio.create_task(long_post(server))
    queued = asyncio.create_task(long_post(server))  # waits for the only slot: held as well
    await wait_for(lambda: holds(gw).requests.get("acme") == 2)
    view = await admin_view(server)
    assert view["acme"]["requests_in_flight"] == 2
    assert view["acme"]["body_bytes_in_flight"] > 0
    assert view["globex"]["requests_in_flight"] == 0
    with pytest.raises(openai.RateLimitError) as over:
        await short_chat(client_for(server, ACME))
    assert isinstance(over.value.body, dict) and over.value.body["code"] == "concurrency_limit"
    assert "max_concurrent = 2" in over.value.body["message"]
    assert over.value.response.headers["Retry-After"] == "1"
    assert_openai_error(over.value.response.content, 429)
    # globex has its own count: it is admitted (and queues behind acme's slot, not refused).
    globex = asyncio.create_task(long_post(server, GLOBEX))
    await wait_for(lambda: holds(gw).requests.get("globex") == 1)
    assert holds(gw).requests["acme"] == 2
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as r:
        metrics = await r.text()
    assert scrape(metrics, "fairway_rejected_requests_total", tenant="acme", status="429") == 1
    assert scrape(metrics, "fairway_rejected_requests_total", tenant="globex") == 0
    await cancel(running, queued, globex)  # one running, two queued: the clients go away
    await wait_for(lambda: released(gw))
    view = await admin_view(server)
    assert view["acme"]["requests_in_flight"] == 0 and view["acme"]["body_bytes_in_flight"] == 0
    assert (await short_chat(client_for(server, ACME))).http_response.status_code == 200
    assert released(gw)


async def test_counts_return_to_zero_however_requests_end(start_gateway: GatewayFactory) -> None:
    cfg = limits_config(max_running=1, max_concurrent=10)
    cfg["fairness"] = {"queue_timeout_s": 0.5}
    server, gw = await start_gateway(cfg)
    acme = client_for(server, ACME)
    # A stream whose client goes away mid-way holds the slot; one waits and times out.
    streaming = asyncio.create_task(long_post(server, stream=True))
    await wait_for(lambda: gw.gate.core.ledger.total() == 1)
    with pytest.raises(openai.InternalServerError) as late:
        await short_chat(acme)
    assert isinstance(late.value.body, dict) and late.value.body["code"] == "queue_timeout"
    assert holds(gw).requests["acme"] == 1
    # One that is refused after it was held (unknown model), and one whose client leaves the
    # queue.
    with pytest.raises(openai.NotFoundError):
        await acme.chat.completions.create(model="nope", messages=[{"role": "user",
                                                                   "content": "x"}])  # fmt: skip
    leaver = asyncio.create_task(long_post(server))
    await wait_for(lambda: holds(gw).requests.get("acme") == 2)
    await cancel(leaver)
    await wait_for(lambda: holds(gw).requests.get("acme") == 1)
    await cancel(streaming)
    await wait_for(lambda: released(gw) and gw.gate.core.ledger.total() == 0)
    # And one that finishes.
    assert (await short_chat(acme)).http_response.status_code == 200
    assert released(gw)


async def raw_connection(server: TestServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.host is not None and server.port is not None
    return await asyncio.open_connection(server.host, server.port)


def head(key: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


async def post(server: TestServer, key: str, body: bytes) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            server.make_url(CHAT),
            data=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as r,
    ):
        return r.status, await r.read()


async def test_content_length_is_reserved_before_the_body_is_read(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway(limits_config(max_body_bytes_in_flight=10_000))
    # A slow uploader announces 8000 bytes and sends 10 of them.
    reader, writer = await raw_connection(server)
    writer.write(head(ACME, 8000) + b'{"model":"')
    await writer.drain()
    await wait_for(lambda: holds(gw).body_bytes.get("acme") == 8000)
    assert (await admin_view(server))["acme"]["body_bytes_in_flight"] == 8000
    body = chat_body(4, pad=4000 - len(chat_body(4)))
    assert len(body) == 4000
    status, raw = await post(server, ACME, body)
    assert status == 429, raw
    assert assert_openai_error(raw, 429)["code"] == "body_bytes_limit"
    assert (await post(server, GLOBEX, body))[0] == 200  # another tenant is unaffected
    assert holds(gw).body_bytes == {"acme": 8000} and holds(gw).requests == {"acme": 1}
    writer.close()  # the uploader goes away
    await writer.wait_closed()
    await wait_for(lambda: released(gw))
    assert (await post(server, ACME, body))[0] == 200
    assert released(gw)
    del reader


async def test_chunked_body_is_counted_as_it_arrives(start_gateway: GatewayFactory) -> None:
    server, gw = await start_gateway(limits_config(max_body_bytes_in_flight=10_000))
    reader, writer = await raw_connection(server)
    writer.write(head(ACME, None) + b"1770\r\n" + b" " * 6000 + b"\r\n")
    await writer.drain()
    await wait_for(lambda: holds(gw).body_bytes.get("acme") == 6000)
    writer.write(b"1770\r\n" + b" " * 6000 + b"\r\n")  # 12000 in all: past the limit
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read(65536)
    assert answer.startswith(b"HTTP/1.1 429"), answer[:200]
    assert b"body_bytes_limit" in answer and b"Retry-After: 1" in answer
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: released(gw))
    assert (await post(server, ACME, chat_body(4)))[0] == 200
    assert released(gw)


def test_limits_default_validate_and_zero_means_none() -> None:
    cfg = config_dict()
    acme = parse(cfg).tenants["acme"]
    assert acme.max_concurrent == 256 and acme.max_body_bytes_in_flight == 64 << 20
    for key in ("max_concurrent", "max_body_bytes_in_flight"):
        bad = config_dict()
        bad["tenants"]["acme"][key] = -1
        with pytest.raises(ConfigError) as err:
            parse(bad)
        assert f"tenants.acme.{key}" in str(err.value)
    cfg["tenants"]["acme"].update(max_concurrent=0, max_body_bytes_in_flight=0)
    free = parse(cfg)
    h = Holds()
    held = [h.enter("acme", free) for _ in range(1000)]
    for one in held:
        one.reserve(1 << 30)
    assert h.requests["acme"] == 1000 and h.body_bytes["acme"] == 1000 << 30
    for one in held:
        one.release()
        one.release()  # twice is once
    assert h.requests == {} and h.body_bytes == {}
