"""SIGTERM against a real `fairway serve` process: readiness turns 503 at once, new requests
are refused, what runs finishes up to the deadline, what remains ends with an error event, and
the process exits 0."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp

from tests.conftest import ACME, MODEL, config_dict
from tests.serving import serving

AUTH = {"Authorization": f"Bearer {ACME}"}


def _body(tokens: int) -> dict[str, object]:
    return {"model": MODEL, "stream": True, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


async def test_sigterm_finishes_streams_then_ends_the_rest_and_exits_0(tmp_path: Path) -> None:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}}, shutdown_timeout_s=1.5)
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token
    cfg["logging"]["level"] = "info"
    async with serving(cfg, tmp_path) as (proc, base, log), aiohttp.ClientSession() as http:
        chat = f"{base}/v1/chat/completions"
        short = await http.post(chat, json=_body(60), headers=AUTH)  # ~0.5 s: finishes
        long = await http.post(chat, json=_body(3000), headers=AUTH)  # ~25 s: is cut
        assert short.status == long.status == 200
        await short.content.readline()
        await long.content.readline()
        # A keep-alive connection opened before the signal asks for readiness after it.
        probe = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with probe.get(f"{base}/healthz") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        ready: dict[str, object] = {}
        for _ in range(100):
            async with probe.get(f"{base}/healthz") as r:
                ready = await r.json()
                if r.status == 503:
                    break
            await asyncio.sleep(0.02)
        assert ready["status"] == "shutting down"
        # New work is refused at once, with the reason.
        async with probe.post(chat, json=_body(5), headers=AUTH) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "shutting_down"
        await probe.close()
        short_rest = (await short.content.read()).decode()
        long_rest = (await long.content.read()).decode()
        assert short_rest.rstrip().endswith("data: [DONE]") and '"error"' not in short_rest
        assert "shutting down" in long_rest and long_rest.rstrip().endswith("data: [DONE]")
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    stderr = log.read_text()
    assert '"event":"stopping"' in stderr and '"event":"stopped"' in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]


async def test_request_heads_that_stall_get_408_and_are_closed(tmp_path: Path) -> None:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}}, head_timeout_s=0.5)
    async with serving(cfg, tmp_path) as (_, base, _log):
        port = int(base.rsplit(":", 1)[1])
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        for _, writer in conns:  # half a head, then nothing
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        # An idle keep-alive connection (no bytes yet) is not a stalled head.
        idle = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            answers = [await reader.read() for reader, _ in conns]  # to EOF
        for raw in answers:
            assert raw.startswith(b"HTTP/1.1 408"), raw[:200]
            assert b'"code":"request_timeout"' in raw
        # The idle one still serves a whole request, sent slowly but within the deadline.
        reader, writer = idle
        for part in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            writer.write(part)
            await asyncio.sleep(0.1)
        async with asyncio.timeout(5):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
        for _, w in [*conns, idle]:
            w.close()
        async with aiohttp.ClientSession() as http, http.get(f"{base}/healthz") as r:
            assert r.status == 200
