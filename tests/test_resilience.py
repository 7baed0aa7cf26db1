"""Client disconnects abort the engine's work; dead engines are skipped, ejected, re-admitted."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.fleet.health import probe
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, config_dict, free_port, scrape, start_sim

Served = tuple[TestServer, Gateway]
AUTH = {"Authorization": f"Bearer {ACME}"}
CHAT = "/v1/chat/completions"
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 4000,
    "ignore_eos": True,
}


async def engine_metrics(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as r:
        return await r.text()


async def wait_for(predicate: Any, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def one_engine(start_gateway: Any) -> tuple[TestServer, Gateway, str]:
    runner, url = await start_sim(time_scale=0.2)
    server, gw = await start_gateway(
        config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
    )
    yield server, gw, url
    await runner.cleanup()


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_upstream(
    one_engine: tuple[TestServer, Gateway, str], stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    server, gw, url = one_engine
    async with aiohttp.ClientSession() as http:
        body = {**LONG, "stream": stream}
        if stream:
            async with http.post(server.make_url(CHAT), json=body, headers=AUTH) as r:
                assert r.status == 200
                await r.content.readuntil(b"\n\n")  # one token arrived, then we hang up
        else:
            to = aiohttp.ClientTimeout(total=0.3)
            with pytest.raises(asyncio.TimeoutError):
                await http.post(server.make_url(CHAT), json=body, headers=AUTH, timeout=to)

        async def aborted() -> bool:
            text = await engine_metrics(http, url)
            return (
                scrape(text, "vllm:request_success_total", finished_reason="abort") == 1
                and scrape(text, "vllm:num_requests_running") == 0
            )

        await wait_for(aborted)
        assert gw.gate.core.ledger.in_flight("us-east/llama-3.1-8b/0") == 0
        assert scrape(await engine_metrics(http, url), "vllm:kv_cache_usage_perc") == 0
    # A client that hangs up is not a server error: no traceback anywhere.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_failover_to_live_engine_and_readmission(start_gateway: Any) -> None:
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    live_runner, live = await start_sim()
    cfg = config_dict(
        {
            "us-east": {
                MODEL: [
                    {"kind": "vllm", "url": dead, "id": "dead"},
                    {"kind": "vllm", "url": live, "id": "live"},
                ]
            }
        },
        health_interval_s=60,
    )
    server, gw = await start_gateway(cfg)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0)
    msgs: Any = [{"role": "user", "content": "hi"}]
    try:
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=msgs, max_tokens=3
            )
            assert raw.headers["x-fairway-engine"] == "live"
        dead_state = gw.registry.engines["dead"]
        assert not dead_state.healthy  # ejected on its first refused connection
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as r:
            text = await r.text()
        assert scrape(text, "fairway_upstream_errors_total", engine="dead", kind="connect") == 1
        assert scrape(text, "fairway_engine_healthy", engine="dead") == 0
        # The engine comes up; the next probe re-admits it and it takes traffic again.
        revived, _ = await start_sim(port=port)
        try:
            await probe(gw.registry, dead_state, gw.probes, 1.0, lambda e, ev: None)
            assert dead_state.healthy
            seen = set()
            for _ in range(4):
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=msgs, max_tokens=3
                )
                seen.add(raw.headers["x-fairway-engine"])
            assert seen == {"dead", "live"}
        finally:
            await revived.cleanup()
    finally:
        await live_runner.cleanup()


async def test_health_loop_ejects_and_readmits(start_gateway: Any) -> None:
    runner, url = await start_sim()
    port = int(url.rsplit(":", 1)[1])
    _server, gw = await start_gateway(
        config_dict(
            {"us-east": {MODEL: [{"kind": "vllm", "url": url, "id": "e"}]}},
            health_interval_s=0.05,
            unhealthy_after=2,
        )
    )
    state = gw.registry.engines["e"]

    async def healthy() -> bool:
        return state.healthy

    async def ejected() -> bool:
        return not state.healthy

    await runner.cleanup()
    await wait_for(ejected)
    runner, _ = await start_sim(port=port)
    try:
        await wait_for(healthy)
    finally:
        await runner.cleanup()


async def test_engine_dying_mid_stream_ends_stream_with_error(start_gateway: Any) -> None:
    """A `fairway sim` process killed mid-stream: the client gets an error event, not a hang."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "sim",
        "--port",
        str(port),
        "--time-scale",
        "0.2",
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                try:
                    async with http.get(f"{url}/health") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(up, within=20)
            server, _ = await start_gateway(
                config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
            )
            body = {**LONG, "stream": True}
            async with http.post(server.make_url(CHAT), json=body, headers=AUTH) as r:
                await r.content.readuntil(b"\n\n")
                proc.kill()
                rest = await r.read()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert b'"upstream_error"' in rest
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_slow_reader_gets_every_token(start_gateway: Any) -> None:
    """A client with a tiny receive window that stops reading while its whole stream is
    generated still gets every token, and the chunked framing intact, once it reads again."""
    import socket

    runner, url = await start_sim(time_scale=0.001)
    try:
        server, _ = await start_gateway(
            config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
        )
        body = orjson.dumps({**LONG, "max_tokens": 6000, "stream": True})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (server.host, server.port))
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(sock, head.encode() + body)
        await asyncio.sleep(1.5)  # the whole stream is generated while nobody reads
        raw = b""
        while not raw.endswith(b"0\r\n\r\n"):
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=10)
            assert data, "connection closed early"
            raw += data
        sock.close()
    finally:
        await runner.cleanup()
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.count(b'"content":') == 6000
    assert b"data: [DONE]" in raw


async def test_http10_client_gets_a_close_delimited_stream(
    start_gateway: Any,
) -> None:
    server, gw = await start_gateway()
    body = orjson.dumps({"model": "llama-3.1-8b", "stream": True, "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\n"
                 b"Authorization: Bearer sk-test-acme-chat\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))  # fmt: skip
    async with asyncio.timeout(10):
        raw = await reader.read()  # to EOF: the gateway closes the connection at the end
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
    events = [e for e in rest.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events), rest[:300]
    assert sum(b'"content"' in e for e in events) == 5
    assert gw.gate.core.ledger.total() == 0


async def test_a_stream_whose_client_reads_nothing_is_cut_and_frees_its_slot(
    start_gateway: Any, http: aiohttp.ClientSession
) -> None:
    cfg = config_dict(
        {"us-east": {"llama-3.1-8b": [{"kind": "sim"}]}},
        send_timeout_s=0.5,
        send_buffer_bytes=16384,
    )
    cfg["sim"]["time_scale"] = 0.001  # tokens come far faster than anyone reads them
    server, gw = await start_gateway(cfg)
    body = orjson.dumps(
        {
            "model": "llama-3.1-8b",
            "stream": True,
            "max_tokens": 8000,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that stops reading
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-test-acme-chat\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
    await asyncio.get_running_loop().sock_sendall(sock, head + body)
    try:
        await wait_for(lambda: asyncio.sleep(0, gw.gate.core.ledger.total() == 1))
        await wait_for(lambda: asyncio.sleep(0, gw.gate.core.ledger.total() == 0), within=20)
    finally:
        sock.close()
    text = await (await http.get(server.make_url("/metrics"))).text()
    assert scrape(text, "fairway_dropped_requests_total", reason="send_timeout") == 1
    # The tenant was charged for what was relayed, and the engine serves the next request.
    counters = gw.gate.dispatcher.policy("llama-3.1-8b").counters()
    assert counters.get("acme", 0.0) > 0
    async with http.post(
        server.make_url(CHAT),
        json={
            "model": "llama-3.1-8b",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers=AUTH,
    ) as r:
        assert r.status == 200
