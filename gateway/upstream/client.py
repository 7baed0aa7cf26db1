"""A lean HTTP/1.1 client for engines: keep-alive pools and callback-driven streaming bodies.

A streamed completion is one small chunk per token, so the proxy's cost per chunk is its cost.
Here a decoded body chunk is handed to a synchronous sink straight from `data_received`: no
stream reader, no future and no task switch per token. Requests are always `POST` with a
`Content-Length` body; responses may be chunked, sized, or delimited by the connection closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

Sink = Callable[[bytes], None]
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The engine broke the exchange (closed, reset, or sent something unparsable)."""


class ConnectFailed(UpstreamError):
    """No connection could be made, or it failed before the engine sent a byte."""


class ReadTimeout(UpstreamError):
    """Connected, then silent for longer than the read timeout."""


class Exchange(asyncio.Protocol):
    """One keep-alive connection; carries one request/response at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        loop = self.pool.loop
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.got_bytes = False
        self.keep_alive = True
        self.sink: Sink | None = None
        self.body: list[bytes] = []
        self._buf = b""
        self._in_head = True
        self._chunked = False
        self._remaining = -1  # bytes left of a sized body; -1 until the connection closes
        self._chunk_left = 0  # bytes left of the current chunk; -1 reading trailers
        self.last_activity = time.monotonic()

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._forget(self)
        if self.done.done():
            return
        if not self._in_head and not self._chunked and self._remaining < 0:
            self._finish()  # body delimited by the connection closing
            return
        err = (ConnectFailed if not self.got_bytes else UpstreamError)(
            f"engine closed the connection: {exc!r}" if exc else "engine closed the connection"
        )
        self._fail(err)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = time.monotonic()
        if self.done.done():
            # Bytes after a finished response: the connection cannot be trusted any more.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if self._in_head:
            end = data.find(b"\r\n\r\n")
            if end == -1:
                if len(data) > MAX_HEAD:
                    self._fail(UpstreamError("response head too large"))
                else:
                    self._buf = data
                return
            try:
                self._parse_head(data[:end])
            except (ValueError, IndexError) as exc:
                self._fail(UpstreamError(f"malformed response head: {exc}"))
                return
            data = data[end + 4 :]
            if self.status < 200:  # 1xx: wait for the real response
                self.status = 0
                if data:
                    self.data_received(data)
                return
            self._in_head = False
            self.head_ready.set_result(None)
            if self._remaining == 0:
                self._finish()
                return
        if self._chunked:
            self._chunks(data)
        else:
            if self._remaining >= 0:
                data, extra = data[: self._remaining], data[self._remaining :]
                self._remaining -= len(data)
                if extra:
                    self.keep_alive = False
            self._deliver(data)
            if self._remaining == 0:
                self._finish()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what it meant

    # parsing ------------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0]!r}")
        self.status = int(status)
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        conn = self.headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn and (version == "HTTP/1.1" or "keep-alive" in conn)
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
        elif self.status in (204, 304):
            self._remaining = 0
        else:
            self.keep_alive = False  # read until the connection closes

    def _chunks(self, data: bytes) -> None:
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            if self._chunk_left > 0:  # inside a chunk's data
                take = min(self._chunk_left, n - pos)
                out.append(data[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_left = -2  # expect the CRLF after the data
                continue
            eol = data.find(b"\r\n", pos)
            if eol == -1:
                self._buf = data[pos:]
                break
            line = data[pos:eol]
            pos = eol + 2
            if self._chunk_left == -2:  # the CRLF closing a chunk's data
                self._chunk_left = 0
                continue
            if self._chunk_left == -1:  # trailers, until an empty line
                if not line:
                    self._deliver(b"".join(out))
                    self._finish()
                    return
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                self._fail(UpstreamError(f"bad chunk size line {line[:40]!r}"))
                return
            self._chunk_left = size if size else -1
        if out:
            self._deliver(out[0] if len(out) == 1 else b"".join(out))

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self.sink is not None:
            self.sink(data)
        else:
            self.body.append(data)

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        for fut in (self.head_ready, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: a waiter may be gone (client left)
        if self.transport is not None:
            self.transport.close()

    # the exchange as the proxy uses it ---------------------------------------------------

    async def read(self) -> bytes:
        await self.done
        return b"".join(self.body)

    def stream(self, sink: Sink) -> None:
        """Hand body chunks to `sink` from now on, starting with any already received."""
        if self.body:
            data = b"".join(self.body)
            self.body.clear()
            sink(data)
        self.sink = sink

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def release(self) -> None:
        """Give the connection back: to the pool if the response ended cleanly, else close."""
        if (
            self.done.done()
            and not self.done.cancelled()
            and self.done.exception() is None
            and self.keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.pool._park(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection: for an engine, the request's client has gone away."""
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self._fail(UpstreamError("aborted"))


class UpstreamPool:
    """Keep-alive connections to every engine, opened on demand and reused."""

    def __init__(self, connect_timeout: float, read_timeout: float, max_idle: int = 256) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int, bool], deque[Exchange]] = {}
        self._busy: set[Exchange] = set()
        self._ssl: ssl.SSLContext | None = None
        self._watchdog = self.loop.create_task(self._watch())

    async def request(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Exchange:
        """Send a POST and wait for the response head. Raises ConnectFailed, ReadTimeout or
        UpstreamError; ConnectFailed means the engine saw nothing and another may be tried."""
        url = urlsplit(base_url)
        tls = url.scheme == "https"
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if tls else 80)
        key = (host, port, tls)
        head = [f"POST {url.path.rstrip('/')}{path} HTTP/1.1", f"Host: {url.netloc}",
                f"Content-Length: {len(body)}"]  # fmt: skip
        head += [f"{k}: {v}" for k, v in headers.items()]
        payload = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        while True:
            ex = self._take_idle(key)
            fresh = ex is None
            if ex is None:
                ex = await self._connect(key)
            self._busy.add(ex)
            assert ex.transport is not None
            ex.transport.write(payload)
            try:
                await ex.head_ready
                return ex
            except ConnectFailed:
                self._busy.discard(ex)
                if fresh:
                    raise
                # A kept-alive connection the engine had just closed: try a new one.
            except BaseException:
                self._busy.discard(ex)
                ex.abort()
                raise

    def done_with(self, ex: Exchange) -> None:
        self._busy.discard(ex)
        ex.release()

    def _take_idle(self, key: tuple[str, int, bool]) -> Exchange | None:
        idle = self._idle.get(key)
        while idle:
            ex = idle.pop()
            if ex.transport is not None and not ex.transport.is_closing():
                ex._reset()
                return ex
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> Exchange:
        host, port, tls = key
        ctx: ssl.SSLContext | None = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, ex = await self.loop.create_connection(
                    lambda: Exchange(self, key), host, port, ssl=ctx
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc!r}") from exc
        return ex

    def _park(self, ex: Exchange) -> None:
        idle = self._idle.setdefault(ex.key, deque())
        if len(idle) >= self.max_idle:
            ex.abort()
            return
        idle.append(ex)

    def _forget(self, ex: Exchange) -> None:
        self._busy.discard(ex)
        idle = self._idle.get(ex.key)
        if idle and ex in idle:
            idle.remove(ex)

    async def _watch(self) -> None:
        """Fail exchanges whose engine has been silent for longer than the read timeout."""
        period = min(1.0, self.read_timeout / 4)
        while True:
            await asyncio.sleep(period)
            limit = time.monotonic() - self.read_timeout
            for ex in [e for e in self._busy if e.last_activity < limit]:
                self._busy.discard(ex)
                ex._fail(ReadTimeout(f"engine silent for {self.read_timeout:g} s"))

    async def close(self) -> None:
        self._watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watchdog
        for idle in self._idle.values():
            for ex in idle:
                ex.abort()
        for ex in list(self._busy):
            ex.abort()
        self._idle.clear()
        self._busy.clear()
