"""SIGTERM against a real `fairway serve` process: readiness turns 503 at once, new requests
are refused, what runs finishes up to the deadline, what remains ends with an error event, and
the process exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import tomli_w

from tests.conftest import ACME, MODEL, config_dict, free_port

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {ACME}"}


def _body(tokens: int) -> dict[str, object]:
    return {"model": MODEL, "stream": True, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip


async def test_sigterm_finishes_streams_then_ends_the_rest_and_exits_0(tmp_path: Path) -> None:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}}, shutdown_timeout_s=1.5)
    cfg["sim"]["time_scale"] = 1.0  # ~8 ms a token
    cfg["logging"]["level"] = "info"
    path = tmp_path / "fairway.toml"
    path.write_text(tomli_w.dumps(cfg))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port", str(port),
        cwd=ROOT, stderr=log,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                assert proc.returncode is None
                try:
                    async with http.get(f"{base}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "no gateway"
                await asyncio.sleep(0.05)
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
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
    stderr = (tmp_path / "gateway.log").read_text()
    assert '"event":"stopping"' in stderr and '"event":"stopped"' in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
