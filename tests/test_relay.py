"""The SSE relay: usage read from the events that carry it, and a stream framed right whether
the engine's whole answer is in before the client's head goes out (it all leaves in one write)
or comes token by token (no token held back that the client could already read)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from engines.protocol import SSE_DONE, sse_event
from gateway.upstream.sse import Usage, filter_events
from tests.conftest import ACME, MODEL, config_dict


def chunk(i: int, usage: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]
        if choices
        else [],
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion}


def test_only_events_naming_usage_are_rewritten() -> None:
    # A token whose text is the word "usage" (quoted in the content), a usage chunk per token
    # (continuous usage stats) and the usage-only chunk asked for on the client's behalf.
    word = sse_event(chunk(0) | {"choices": [{"index": 0, "delta": {"content": '"usage":{'}}]})
    plain = sse_event(chunk(1))
    block = word + plain + sse_event(chunk(2, usage(2))) + plain
    block += sse_event(chunk(3, usage(3), choices=False)) + SSE_DONE

    out, seen = filter_events(block, False, Usage()), Usage()
    assert out == word + plain + sse_event(chunk(2)) + plain + SSE_DONE
    filter_events(block, False, seen)
    assert (seen.prompt_tokens, seen.completion_tokens) == (3, 3)

    asked = Usage()
    assert filter_events(block, True, asked) == block  # the client asked: bytes untouched
    assert asked.completion_tokens == 3
    assert filter_events(plain + SSE_DONE, False, Usage()) == plain + SSE_DONE


def test_an_unterminated_last_event_is_still_filtered() -> None:
    tail = sse_event(chunk(1, usage(1), choices=False)).rstrip(b"\n")
    seen = Usage()
    assert filter_events(sse_event(chunk(0)) + tail, False, seen) == sse_event(chunk(0))
    assert seen.completion_tokens == 1


class Engine:
    """A vLLM-shaped engine whose stream the test paces: `whole` answers in one body with its
    head; otherwise the first token goes out, then the rest once `go` is set."""

    def __init__(self, whole: bool) -> None:
        self.whole = whole
        self.go = asyncio.Event()
        self.events = [sse_event(chunk(i)) for i in range(4)]
        self.events.append(sse_event(chunk(4, usage(4), choices=False)))
        self.events.append(SSE_DONE)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        if self.whole:
            return web.Response(body=b"".join(self.events), content_type="text/event-stream")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(self.events[0])
        await self.go.wait()
        for e in self.events[1:]:
            await resp.write(e)
        await resp.write_eof()
        return resp

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")


@pytest.fixture
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Engine, str]]:
    eng = Engine(whole=request.param)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", eng.chat)
    app.router.add_get("/health", eng.health)
    app.router.add_get("/metrics", eng.metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield eng, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        eng.go.set()
        await runner.cleanup()


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """An HTTP/1.1 chunked body decoded, and whether its terminal chunk was there."""
    out = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out, body == b"\r\n"
        assert body[n : n + 2] == b"\r\n", body[: n + 2]
        out, body = out + body[:n], body[n + 2 :]
    return out, False


@pytest.mark.parametrize("engine", [True, False], indirect=True, ids=["whole", "paced"])
async def test_stream_framing_and_pace(start_gateway: Any, engine: tuple[Engine, str]) -> None:
    eng, url = engine
    server, gw = await start_gateway(
        config_dict({"local": {MODEL: [{"kind": "vllm", "url": url}]}})
    )
    body = orjson.dumps({"model": MODEL, "stream": True, "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (ACME.encode(), len(body), body))  # fmt: skip
    raw = b""
    async with asyncio.timeout(10):
        if not eng.whole:
            # The first token reaches the client while the engine still holds the rest back.
            while b" w0" not in raw:
                raw += await reader.read(1 << 20)
            eng.go.set()
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            raw += await reader.read(1 << 20)
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    events, complete = dechunk(rest)
    assert complete
    # The usage-only chunk the gateway asked for is not the client's; its count was read.
    assert events == b"".join(eng.events[:4]) + SSE_DONE
    await asyncio.sleep(0.05)  # the handler's accounting runs after the last byte
    assert gw.gate.core.ledger.total() == 0
