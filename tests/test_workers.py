"""`fairway serve --workers N`: N processes on one port, sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w

from tests.conftest import ACME, MODEL, config_dict, free_port, scrape, start_sim
from tests.serving import ROOT
from tests.test_gate import redis_server, redis_url  # noqa: F401  (fixtures)


async def run_serve(cfg: dict[str, Any], tmp_path: Path, *extra: str) -> asyncio.subprocess.Process:
    path = tmp_path / "fairway.toml"
    path.write_text(tomli_w.dumps(cfg))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), *extra, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_more_than_one_worker_with_the_memory_backend_is_refused(tmp_path: Path) -> None:
    proc = await run_serve(config_dict(), tmp_path, "--workers", "2")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b'needs [state] backend = "redis"' in err


async def test_two_workers_share_one_port_and_stop_on_sigterm(
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    runner, url = await start_sim(time_scale=0.02)
    try:
        cfg = config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
        cfg["state"] = {"backend": "redis", "redis_url": redis_url}
        port = free_port()
        proc = await run_serve(cfg, tmp_path, "--workers", "2", "--port", str(port))
        base = f"http://127.0.0.1:{port}"
        try:
            assert proc.stderr is not None
            while b"workers, pids" not in (
                line := await asyncio.wait_for(proc.stderr.readline(), 30)
            ):
                assert line, "no workers"
            pids = [int(x) for x in line.split(b"pids", 1)[1].split()]
            assert len(pids) == 2
            async with aiohttp.ClientSession() as http:
                deadline = asyncio.get_running_loop().time() + 30
                # Both workers listen, and each counts the other through Redis.
                while True:
                    assert asyncio.get_running_loop().time() < deadline, "no second worker"
                    try:
                        async with http.get(f"{base}/metrics") as r:
                            if scrape(await r.text(), "fairway_replicas") == 2:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
            # A worker that dies is replaced; the other serves meanwhile.
            os.kill(pids[0], signal.SIGKILL)
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=ACME, max_retries=0)
            rs = await asyncio.gather(*(
                client.chat.completions.create(model=MODEL, max_tokens=8,
                                               messages=[{"role": "user", "content": "hi"}])
                for _ in range(20)
            ))  # fmt: skip
            assert all(r.usage is not None and r.usage.completion_tokens > 0 for r in rs)
            await client.close()
            while b"starting another" not in (
                line := await asyncio.wait_for(proc.stderr.readline(), 30)
            ):
                assert line
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
            assert proc.returncode == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("workers", ["0", "-1"])
async def test_workers_below_one_are_refused(tmp_path: Path, workers: str) -> None:
    proc = await run_serve(config_dict(), tmp_path, "--workers", workers)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"at least 1" in err
