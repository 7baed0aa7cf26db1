"""Engines that answer 5xx: bounded retries, the circuit breaker, and a health loop that lives."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.fleet import health
from gateway.fleet.registry import EngineRegistry, EngineState
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, config_dict, scrape

MSGS: Any = [{"role": "user", "content": "hi"}]
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": MODEL,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class FakeEngine:
    """A vLLM-shaped HTTP server whose answers the test sets."""

    def __init__(self) -> None:
        self.chat_status = 200
        self.health_status = 200
        self.health_delay_s = 0.0
        self.metrics_body = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        self.chats = 0
        self.metrics_scrapes = 0
        self.runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.chats += 1
        if self.chat_status >= 500:
            err = {"error": {"message": "engine broke", "type": "InternalServerError"}}
            return web.json_response(err, status=self.chat_status)
        return web.json_response(COMPLETION)

    async def _health(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.health_delay_s)
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics_scrapes += 1
        return web.Response(body=self.metrics_body, content_type="text/plain", charset="utf-8")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[int], Any]]:
    started: list[FakeEngine] = []

    async def make(n: int) -> list[tuple[FakeEngine, str]]:
        out = []
        for _ in range(n):
            fake = FakeEngine()
            out.append((fake, await fake.start()))
            started.append(fake)
        return out

    yield make
    for fake in started:
        if fake.runner is not None:
            await fake.runner.cleanup()


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def client_of(server: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0, timeout=10
    )


async def chat(client: openai.AsyncOpenAI) -> int:
    """One request; the status the client got."""
    try:
        await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=1)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


class Ejections:
    """`engine_ejected` lines the gateway has logged so far (to stdout)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys, self.text = capsys, ""

    def of(self, engine: str) -> list[str]:
        self.text += self.capsys.readouterr().out
        return [line for line in self.text.splitlines()
                if "engine_ejected" in line and f"engine={engine}" in line]  # fmt: skip


async def start(start_gateway: Any, urls: list[str], **server: Any) -> tuple[TestServer, Gateway]:
    engines = [{"kind": "vllm", "url": url, "id": f"e{i}"} for i, url in enumerate(urls)]
    result: tuple[TestServer, Gateway] = await start_gateway(
        config_dict({"us-east": {MODEL: engines}}, **server)
    )
    return result


async def test_a_5xx_is_retried_on_one_more_engine_only(start_gateway: Any, fakes: Any) -> None:
    engines = await fakes(3)
    for fake, _ in engines:
        fake.chat_status = 500
    server, _ = await start(start_gateway, [u for _, u in engines], max_attempts=3,
                            http_5xx_eject_after=100, health_interval_s=60)  # fmt: skip
    assert await chat(client_of(server)) == 503
    assert sum(f.chats for f, _ in engines) == 2  # the first engine and one more, not three
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert scrape(text, "fairway_upstream_errors_total", kind="http_5xx") == 2


async def test_consecutive_5xx_eject_and_a_success_resets_the_count(
    start_gateway: Any, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    [(fake, url)] = await fakes(1)
    server, gw = await start(start_gateway, [url], http_5xx_eject_after=3, health_interval_s=60)
    client, state = client_of(server), gw.registry.engines["e0"]
    ejections = Ejections(capsys)
    fake.chat_status = 500
    assert [await chat(client) for _ in range(2)] == [503, 503]
    fake.chat_status = 200
    assert await chat(client) == 200
    assert state.http_5xx == 0
    fake.chat_status = 500
    assert [await chat(client) for _ in range(2)] == [503, 503]
    assert state.healthy and not ejections.of("e0")  # 2 in a row, not 4 in all
    assert await chat(client) == 503
    assert not state.healthy
    [line] = ejections.of("e0")
    assert "3 consecutive 5xx" in line
    chats = fake.chats
    assert await chat(client) == 503  # ejected: nothing more goes there
    assert fake.chats == chats
    async with aiohttp.ClientSession() as http, http.get(server.make_url("/metrics")) as r:
        assert scrape(await r.text(), "fairway_engine_healthy", engine="e0") == 0


async def test_probes_readmit_half_open_where_one_5xx_ejects_and_successes_close(
    start_gateway: Any, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    [(fake, url)] = await fakes(1)
    server, gw = await start(start_gateway, [url], http_5xx_eject_after=2, healthy_after=2,
                             health_interval_s=0.05)  # fmt: skip
    client, state = client_of(server), gw.registry.engines["e0"]
    ejections = Ejections(capsys)
    fake.chat_status = 500
    while state.healthy:
        assert await chat(client) == 503
    assert len(ejections.of("e0")) == 1
    # /health still answers 200: probes re-admit it, but only on trial.
    await wait_for(lambda: state.healthy)
    assert state.half_open and state.state == "half_open"  # as /admin/engines shows it
    assert await chat(client) == 503
    [_, again] = ejections.of("e0")  # its first 5xx ejected it at once
    assert "half-open" in again
    fake.chat_status = 200
    await wait_for(lambda: state.healthy)
    assert state.half_open
    assert await chat(client) == 200
    assert state.half_open  # one good answer of healthy_after=2
    assert await chat(client) == 200
    assert state.healthy and not state.half_open and state.state == "active"  # closed
    fake.chat_status = 500
    assert await chat(client) == 503
    assert state.healthy  # closed again: one 5xx is counted, not an ejection
    assert len(ejections.of("e0")) == 2


async def test_a_busy_engine_whose_probe_times_out_stays_while_it_finishes_requests(
    start_gateway: Any, fakes: Any
) -> None:
    # Under load an engine's /health can wait behind its work: as long as it finishes
    # requests it is slow, not dead. Once it finishes nothing, time-outs eject it.
    [(fake, url)] = await fakes(1)
    server, gw = await start(start_gateway, [url], health_interval_s=0.05,
                             health_timeout_s=0.05, unhealthy_after=2)  # fmt: skip
    client, state = client_of(server), gw.registry.engines["e0"]
    fake.health_delay_s = 0.5
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.0  # about ten probe rounds, every one timed out
    while loop.time() < until:
        assert await chat(client) == 200
        assert state.healthy
        await asyncio.sleep(0.02)
    await wait_for(lambda: not state.healthy)  # idle now: nothing vouches for it
    fake.health_delay_s = 0.0
    await wait_for(lambda: state.healthy)


async def test_a_connect_time_out_ejects_only_an_engine_that_finishes_nothing(
    start_gateway: Any, fakes: Any
) -> None:
    # A listening socket that never accepts: once its queue is full, connections time out.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    queued = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(hole.getsockname())
        queued.append(c)
    try:
        [(_, url)] = await fakes(1)
        hole_url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        cfg = config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": hole_url, "id": "e0"},
                                              {"kind": "vllm", "url": url, "id": "e1"}]}},
                          connect_timeout_s=0.2, health_interval_s=60)  # fmt: skip
        cfg["routing"] = {"policy": "round-robin"}
        server, gw = await start_gateway(cfg)
        client, state = client_of(server), gw.registry.engines["e0"]
        # Busy but alive (it finished a request a moment ago): tried, passed over, kept.
        state.completed_at = time.monotonic()
        assert [await chat(client) for _ in range(4)] == [200] * 4
        assert state.healthy
        # It has finished nothing for longer than a connect time-out and a probe interval.
        state.completed_at -= 120
        assert [await chat(client) for _ in range(2)] == [200] * 2
        assert not state.healthy
    finally:
        for c in queued:
            c.close()
        hole.close()


def _bad_header(state: EngineState, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    state.api_key = "key\r\nX-Injected: 1"  # aiohttp refuses it with ValueError


def _parser_raises(state: EngineState, fake: FakeEngine, mp: pytest.MonkeyPatch) -> None:
    fake.metrics_body = b"vllm:num_requests_running BOOM\n"
    parse = health.parse_vllm_metrics

    def fragile(text: str) -> dict[str, float]:
        if "BOOM" in text:
            raise RuntimeError("parser bug")
        return parse(text)

    mp.setattr(health, "parse_vllm_metrics", fragile)


def _garbage(state: EngineState, fake: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.metrics_body = b"\xff\xfe\x00garbage{{{ \x80\n"


@pytest.mark.parametrize("break_it", [_bad_header, _parser_raises, _garbage])
async def test_a_failing_probe_never_stops_the_health_loop(
    start_gateway: Any, fakes: Any, monkeypatch: pytest.MonkeyPatch, break_it: Any
) -> None:
    (good, good_url), (bad, bad_url) = await fakes(2)
    _, gw = await start(start_gateway, [good_url, bad_url], health_interval_s=0.05,
                        unhealthy_after=1, healthy_after=1)  # fmt: skip
    good_state, bad_state = gw.registry.engines["e0"], gw.registry.engines["e1"]
    break_it(bad_state, bad, monkeypatch)
    await wait_for(lambda: not bad_state.healthy)  # a failed probe, counted as one
    good.health_status = 503
    await wait_for(lambda: not good_state.healthy)
    good.health_status = 200
    await wait_for(lambda: good_state.healthy)  # still probed, and re-admitted
    assert not bad_state.healthy


async def test_health_loop_sleeps_a_jittered_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[float] = []

    def fake_jitter(interval: float) -> float:
        asked.append(interval)
        return 0.001

    monkeypatch.setattr(health, "jittered", fake_jitter)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(
            health.health_loop(EngineRegistry(), session, 30.0, 1.0, lambda e, ev: None)
        )
        try:
            await wait_for(lambda: len(asked) >= 3)  # a fixed 30 s sleep would never get here
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert set(asked) == {30.0}
    monkeypatch.undo()
    waits = [health.jittered(10.0) for _ in range(200)]
    assert all(8.0 <= w <= 12.0 for w in waits)
    assert len(set(waits)) > 100


def test_probe_thresholds_count_only_consecutive_results() -> None:
    reg = EngineRegistry(unhealthy_after=2, healthy_after=3)
    e = EngineState(id="e", region="r", model=MODEL, url="http://x")
    reg.add(e)
    assert not reg.probe_failed(e)
    reg.probe_ok(e)
    assert not reg.probe_failed(e)  # fail, ok, fail: not two in a row
    assert reg.probe_failed(e)
    assert not e.healthy
    assert not reg.probe_ok(e) and not reg.probe_ok(e)
    reg.probe_failed(e)  # ok, ok, fail: starts over
    assert not reg.probe_ok(e) and not reg.probe_ok(e)
    assert reg.probe_ok(e)
    assert e.healthy and e.half_open
