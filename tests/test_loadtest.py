"""The locust load test, run headless as a user runs it, against a live gateway."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from loadtest.report import load, tables
from tests.conftest import GatewayFactory

ROOT = Path(__file__).resolve().parent.parent


async def test_locust_users_stream_through_the_gateway(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    cfg: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
    cfg["sim"]["time_scale"] = 0.05
    cfg["logging"]["level"] = "warning"
    server, _ = await start_gateway(cfg)
    records = tmp_path / "records.jsonl"
    env = {
        **os.environ,
        "FAIRWAY_RECORDS": str(records),
        "FAIRWAY_MAX_OUTPUT": "16",
        "FAIRWAY_CYCLE_S": "0.3",
        "FAIRWAY_SHAPE": "trace",  # the trace replay shape drives the user count
        "FAIRWAY_SPEEDUP": "600",
        "FAIRWAY_RATE_SCALE": "0.5",
    }
    locust = Path(sys.executable).parent / "locust"
    proc = await asyncio.create_subprocess_exec(
        str(locust), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "-t", "6s", "-H", str(server.make_url("")).rstrip("/"), "--only-summary",
        "AcmeChat", "AcmeAgent", "GlobexChat", "Abuser",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert "TTFT" in text and "STREAM" in text, text[-3000:]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    apps = {(r["tenant"], r["app"]) for r in rows}
    assert {("acme", "chat"), ("acme", "agent"), ("globex", "chat"), ("initech", "batch")} <= apps
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 20 and all(r["first_token"] >= r["arrival"] for r in ok)
    assert all(0 < r["output_tokens"] <= 16 for r in ok)
    agent = [r for r in ok if r["app"] == "agent"]
    assert len({r["interaction"] for r in agent}) < len(agent)  # several calls per interaction
    report = "\n".join(tables(load(records, {"acme": 2.0}), window_s=2.0, label="test"))
    assert "| test | initech |" in report and "max diff" in report
