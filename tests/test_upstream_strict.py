"""The upstream client is strict: malformed framing fails the exchange and burns the connection.

Every test runs a real socket server that answers with crafted bytes, then drives the client
(or a whole gateway) against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from gateway.upstream.client import ConnectFailed, UpstreamError, UpstreamPool
from tests.conftest import ACME, MODEL, config_dict
from tests.test_upstream import read_request

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
HEALTHY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
Reply = bytes | list[bytes]


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


Engine = Callable[..., Awaitable["RawEngine"]]


class RawEngine:
    """Answers each POST with the next crafted reply (the last one repeats) and counts the
    connections it saw open and the ones the client closed. A reply given as a list is
    written one piece at a time, waiting for each write to drain."""

    def __init__(self, *replies: Reply, close_after: bool = False) -> None:
        self.replies = list(replies)
        self.close_after = close_after  # close after each reply: a close-delimited body
        self.gate: asyncio.Event | None = None  # held before a reply's last piece
        self.opened = 0
        self.closed_by_client = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> RawEngine:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            while True:
                try:
                    head = await read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_client += 1
                    return
                if head.startswith(b"GET "):  # the gateway's health and metrics probes
                    writer.write(HEALTHY)
                    continue
                reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
                pieces = reply if isinstance(reply, list) else [reply]
                try:
                    for i, piece in enumerate(pieces):
                        if self.gate is not None and i == len(pieces) - 1:
                            await self.gate.wait()
                        writer.write(piece)
                        await writer.drain()
                except ConnectionError:  # the client gave up on the reply halfway
                    self.closed_by_client += 1
                    return
                if self.close_after:
                    return
        finally:
            writer.close()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    started: list[RawEngine] = []

    async def start(*replies: Reply, close_after: bool = False) -> RawEngine:
        raw = await RawEngine(*replies, close_after=close_after).start()
        started.append(raw)
        return raw

    yield start
    for raw in started:
        raw.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=1.0, read_timeout=2.0)
    yield p
    await p.close()


async def fetch(pool: UpstreamPool, url: str) -> tuple[int, dict[str, str], bytes]:
    ex = await pool.request(url, "/v1/x", b"{}", {"Content-Type": "application/json"})
    try:
        return ex.status, ex.headers, await ex.read()
    finally:
        pool.done_with(ex)


async def assert_refused(pool: UpstreamPool, raw: RawEngine, match: str | None = None) -> None:
    """The exchange fails with a non-retryable UpstreamError and its connection is closed."""
    with pytest.raises(UpstreamError, match=match) as err:
        await fetch(pool, raw.url)
    assert not isinstance(err.value, ConnectFailed)  # bytes had arrived: no retry elsewhere
    await until(lambda: raw.closed_by_client == raw.opened)


@pytest.mark.parametrize("length", [b"-5", b"+5", b"1_0"], ids=["negative", "plus", "underscore"])
async def test_invalid_content_length(engine: Engine, pool: UpstreamPool, length: bytes) -> None:
    raw = await engine(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhello")
    await assert_refused(pool, raw, "Content-Length")


async def test_chunk_data_not_followed_by_crlf(engine: Engine, pool: UpstreamPool) -> None:
    raw = await engine(CHUNKED_HEAD + b"5\r\nhelloXX0\r\n\r\n")
    await assert_refused(pool, raw, "malformed")


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    ],
    ids=["length-first", "encoding-first"],
)
async def test_content_length_with_transfer_encoding(
    engine: Engine, pool: UpstreamPool, framing: bytes
) -> None:
    raw = await engine(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    await assert_refused(pool, raw, "Content-Length")


async def test_interim_responses_are_skipped(engine: Engine, pool: UpstreamPool) -> None:
    raw = await engine(
        [
            b"HTTP/1.1 100 Continue\r\nX-Interim: 100\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nX-Interim: 103\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal",
        ]
    )
    status, headers, body = await fetch(pool, raw.url)
    assert (status, body) == (200, b"final")
    assert headers == {"content-length": "5", "x-final": "yes"}


@pytest.mark.parametrize("size", [b"zz", b"-5", b"5 ", b"0x5"])
async def test_bad_chunk_size(engine: Engine, pool: UpstreamPool, size: bytes) -> None:
    raw = await engine(CHUNKED_HEAD + size + b"\r\nhello\r\n0\r\n\r\n")
    await assert_refused(pool, raw, "chunk size")


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        CHUNKED_HEAD + b"a\r\npartial",
        CHUNKED_HEAD + b"7\r\npartial\r\n",  # no last chunk
        b"HTTP/1.1 200 OK\r\nContent-Le",  # mid-head
    ],
    ids=["sized", "mid-chunk", "before-last-chunk", "mid-head"],
)
async def test_truncated_response(engine: Engine, pool: UpstreamPool, reply: bytes) -> None:
    raw = await engine(reply, close_after=True)
    with pytest.raises(UpstreamError, match="closed the connection") as err:
        await fetch(pool, raw.url)
    assert not isinstance(err.value, ConnectFailed)


async def test_chunked_stream_one_byte_at_a_time(engine: Engine, pool: UpstreamPool) -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(3)] + [b"data: [DONE]\n\n"]
    body = b"".join(b"%x;n=1\r\n%b\r\n" % (len(e), e) for e in events)
    message = CHUNKED_HEAD + body + b"0\r\nX-Trailer: t\r\n\r\n"
    raw = await engine([message[i : i + 1] for i in range(len(message))], OK)
    ex = await pool.request(raw.url, "/v1/x", b"{}", {})
    got: list[bytes] = []
    ex.stream(got.append)
    await ex.done
    assert b"".join(got) == b"".join(events)
    assert "x-trailer" not in ex.headers  # trailers are not response headers
    pool.done_with(ex)
    assert await fetch(pool, raw.url) == (200, {"content-length": "2"}, b"ok")
    assert raw.opened == 1  # the connection stayed usable


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.0 200 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"],
    ids=["http10", "connection-close"],
)
async def test_close_delimited_body(engine: Engine, pool: UpstreamPool, head: bytes) -> None:
    raw = await engine([head, b"all ", b"of it"], close_after=True)
    ex = await pool.request(raw.url, "/v1/x", b"{}", {})
    assert await ex.read() == b"all of it"
    assert not ex.keep_alive
    pool.done_with(ex)


async def test_connection_reused_after_good_response(engine: Engine, pool: UpstreamPool) -> None:
    raw = await engine(OK, CHUNKED_HEAD + b"2\r\nok\r\n0\r\n\r\n", OK)
    for _ in range(3):
        assert (await fetch(pool, raw.url))[2] == b"ok"
    assert raw.opened == 1


async def test_no_reuse_after_bad_response(engine: Engine, pool: UpstreamPool) -> None:
    raw = await engine(CHUNKED_HEAD + b"2\r\nok\r\nzz\r\n", OK)
    await assert_refused(pool, raw)
    assert (await fetch(pool, raw.url))[2] == b"ok"
    assert raw.opened == 2


@pytest.mark.parametrize(
    "reply",
    [
        OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # a response nobody asked for
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nokjunk",
    ],
    ids=["second-response", "after-close"],
)
async def test_bytes_after_the_response_prevent_reuse(
    engine: Engine, pool: UpstreamPool, reply: bytes
) -> None:
    raw = await engine(reply, OK)
    assert (await fetch(pool, raw.url))[2] == b"ok"
    await until(lambda: raw.closed_by_client == 1)
    assert (await fetch(pool, raw.url))[2] == b"ok"
    assert raw.opened == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        b"SPDY/9 hello\r\n\r\n",
    ],
    ids=[
        "obs-fold",
        "control-char",
        "space-in-name",
        "bare-lf",
        "http2",
        "duplicate-length",
        "gzip-coding",
        "upgrade",
        "not-http",
    ],
)
async def test_malformed_head(engine: Engine, pool: UpstreamPool, reply: bytes) -> None:
    raw = await engine(reply)
    await assert_refused(pool, raw, "malformed")


async def test_oversized_head(engine: Engine, pool: UpstreamPool) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 1000) for i in range(80))
    raw = await engine([b"HTTP/1.1 200 OK\r\n", filler])
    await assert_refused(pool, raw, "too large")


# Through the gateway ---------------------------------------------------------------------

CHAT = "/v1/chat/completions"
MESSAGES: Any = [{"role": "user", "content": "hi"}]
TOKEN = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
)


async def gateway_on(start_gateway: Any, raw: RawEngine) -> str:
    cfg = config_dict(
        {"us-east": {MODEL: [{"kind": "vllm", "url": raw.url}]}}, health_interval_s=60
    )
    server, _ = await start_gateway(cfg)
    return str(server.make_url("/v1"))


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        CHUNKED_HEAD + b"2\r\n{}XX0\r\n\r\n",
    ],
    ids=["bad-head", "bad-body"],
)
async def test_gateway_answers_502_for_malformed_response(
    start_gateway: Any, engine: Engine, reply: bytes
) -> None:
    raw = await engine(reply)
    base = await gateway_on(start_gateway, raw)
    async with openai.AsyncOpenAI(base_url=base, api_key=ACME, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert err.value.status_code == 502
    assert err.value.code == "upstream_error"


async def test_gateway_stream_turning_malformed_ends_with_error_event(
    start_gateway: Any, engine: Engine
) -> None:
    good = b"%x\r\n%b\r\n" % (len(TOKEN), TOKEN)
    raw = await engine([CHUNKED_HEAD + good, b"zz\r\n" + TOKEN + b"\r\n"])
    raw.gate = asyncio.Event()  # the bad chunk waits until the client holds the good one
    base = await gateway_on(start_gateway, raw)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/chat/completions", json=body, headers={"Authorization": f"Bearer {ACME}"}
        ) as r,
    ):
        assert r.status == 200
        assert await r.content.readuntil(b"\n\n") == TOKEN
        raw.gate.set()
        rest = await r.read()
    assert b'"upstream_error"' in rest
    assert b"mid-stream" in rest
    assert rest.endswith(b"data: [DONE]\n\n")
