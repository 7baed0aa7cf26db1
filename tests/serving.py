"""`fairway serve` as a real process on a config written to a file, for the tests that need the
process's own signal handling and connection handling."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def serving(
    cfg: dict[str, Any], tmp_path: Path
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    """Start `fairway serve` on `cfg`; yields (process, base URL, its log file) once /healthz
    answers 200, and kills the process on the way out if it still runs."""
    path = tmp_path / "fairway.toml"
    path.write_text(tomli_w.dumps(cfg))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--port",
            str(port), cwd=ROOT, stderr=log,
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:
                deadline = asyncio.get_running_loop().time() + 30
                while True:
                    assert proc.returncode is None, log_path.read_text()[-2000:]
                    try:
                        async with http.get(f"{base}/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert asyncio.get_running_loop().time() < deadline, "no gateway"
                    await asyncio.sleep(0.05)
            yield proc, base, log_path
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
