"""Real servers for every test: the gateway in-process with simulated engines behind it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from engines.sim.engine import SimEngineConfig
from engines.sim.server import build_app as build_sim_app
from gateway.config.schema import Config, parse
from gateway.http.app import build_app
from gateway.http.auth import digest
from gateway.http.state import GATEWAY, Gateway

KEYS = {"sk-test-acme-chat": ("acme", "chat"), "sk-test-globex-chat": ("globex", "chat")}
ACME = "sk-test-acme-chat"
MODEL = "llama-3.1-8b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_dict(engines: dict[str, Any] | None = None, **server: Any) -> dict[str, Any]:
    tenants: dict[str, Any] = {}
    for key, (tenant, app) in KEYS.items():
        t = tenants.setdefault(tenant, {"weight": 1.0, "apps": {app: {}}, "keys": []})
        t["keys"].append({"sha256": digest(key), "app": app})
    if engines is None:
        engines = {
            "us-east": {MODEL: [{"kind": "sim"}, {"kind": "sim"}], "mistral-7b": [{"kind": "sim"}]},
            "eu-west": {MODEL: [{"kind": "sim", "gpu": "A100"}]},
        }
    return {
        "server": {"health_interval_s": 0.2, "health_timeout_s": 0.5, **server},
        "sim": {"time_scale": 0.02, "seed": 1},
        "logging": {"level": "warning"},
        "tenants": tenants,
        "engines": engines,
    }


GatewayFactory = Callable[..., Any]


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Tests run on uvloop, as `fairway serve` does."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def start_gateway(
    aiohttp_server: Callable[..., Any],
) -> AsyncIterator[GatewayFactory]:
    """Start a gateway on a config dict; returns (server, gateway state)."""

    async def start(
        cfg: dict[str, Any] | None = None, config_path: str | None = None
    ) -> tuple[TestServer, Gateway]:
        raw = cfg or config_dict()
        config: Config = parse(raw)
        app = build_app(config, config_path=config_path, raw=raw)
        server = await aiohttp_server(app, auto_decompress=False)  # as `fairway serve` runs it
        return server, server.app[GATEWAY]

    return start


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> tuple[TestServer, Gateway]:
    result: tuple[TestServer, Gateway] = await start_gateway()
    return result


@pytest.fixture
def client(gateway: tuple[TestServer, Gateway]) -> openai.AsyncOpenAI:
    server, _ = gateway
    return openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0, timeout=30
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def start_sim(port: int = 0, **kw: Any) -> tuple[web.AppRunner, str]:
    """A standalone simulated engine, as `fairway sim` runs it."""
    cfg = SimEngineConfig(
        model=kw.pop("model", MODEL),
        arch=kw.pop("arch", MODEL),
        time_scale=kw.pop("time_scale", 0.02),
        seed=1,
        **kw,
    )
    runner = web.AppRunner(build_sim_app(cfg), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def scrape(text: str, name: str, **labels: str) -> float:
    """Sum a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
