"""The lean upstream client against raw HTTP/1.1 servers that misbehave in the usual ways."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.upstream.client import ConnectFailed, ReadTimeout, UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[[Handler], Awaitable[str]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> str:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        s.close()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=1.0, read_timeout=0.3)
    yield p
    await p.close()


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
)


async def test_chunked_body_split_at_every_byte(serve: Serve, pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for i in range(len(CHUNKED)):
            writer.write(CHUNKED[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()  # keep the connection open until the client leaves

    url = await serve(handler)
    ex = await pool.request(url, "/v1/x", b"{}", {"Content-Type": "application/json"})
    got: list[bytes] = []
    ex.stream(got.append)
    await ex.done
    assert ex.status == 200
    assert ex.headers["content-type"] == "text/event-stream"
    assert b"".join(got) == b"hello, world"
    pool.done_with(ex)


async def test_keep_alive_reuse_and_stale_connection_retry(
    serve: Serve, pool: UpstreamPool
) -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):  # serves two requests, then drops the kept-alive connection
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    url = await serve(handler)
    for _ in range(5):
        ex = await pool.request(url, "/", b"", {})
        assert await ex.read() == b"ok"
        pool.done_with(ex)
        await asyncio.sleep(0.01)
    # Five requests, two per connection: the stale pooled connection was replaced silently.
    assert connections == 3


async def test_connect_refused_and_silence(serve: Serve, pool: UpstreamPool) -> None:
    with pytest.raises(ConnectFailed):
        await pool.request("http://127.0.0.1:1", "/", b"", {})

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    url = await serve(silent)
    with pytest.raises(ReadTimeout):
        await pool.request(url, "/", b"", {})


async def test_garbage_and_midway_close(serve: Serve, pool: UpstreamPool) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SPDY/9 hello\r\n\r\n")
        await writer.drain()

    with pytest.raises(UpstreamError):
        await pool.request(await serve(garbage), "/", b"", {})

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    ex = await pool.request(await serve(cut), "/", b"", {})
    with pytest.raises(UpstreamError) as err:
        await ex.read()
    assert not isinstance(err.value, ConnectFailed)  # bytes had arrived: not retryable
    pool.done_with(ex)


async def test_body_until_close(serve: Serve, pool: UpstreamPool) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    ex = await pool.request(await serve(http10), "/", b"", {})
    assert await ex.read() == b"all of it"
    assert not ex.keep_alive
    pool.done_with(ex)
