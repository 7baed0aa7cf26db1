"""A lean HTTP/1.1 client for engines: keep-alive pools and callback-driven streaming bodies.

A streamed completion is one small chunk per token, so the proxy's cost per chunk is its cost.
Responses are parsed by llhttp (through httptools) with its strict defaults, and a decoded body
chunk is handed to a synchronous sink straight from `data_received`: no stream reader, no future
and no task switch per token. Requests are always `POST` with a `Content-Length` body;
responses may be chunked, sized, or delimited by the connection closing. Anything llhttp
refuses, and a response carrying both `Content-Length` and `Transfer-Encoding`, fails the
exchange and closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import SplitResult, urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

Sink = Callable[[bytes], None]
MAX_HEAD = 64 * 1024


class UpstreamError(Exception):
    """The engine broke the exchange (closed, reset, or sent something unparsable)."""


class ConnectFailed(UpstreamError):
    """No connection could be made, or it failed before the engine sent a byte. `timed_out`:
    the connection was not refused, it was not made within the connect timeout."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ReadTimeout(UpstreamError):
    """Connected, then silent for longer than the read timeout."""


class Exchange(asyncio.Protocol):
    """One keep-alive connection; carries one request/response at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        # One parser per connection: after a complete keep-alive response it awaits the next.
        self._parser = HttpResponseParser(self)
        self._pieces: list[bytes] = []  # body bytes parsed from the current read
        self._reset()

    def _reset(self) -> None:
        loop = self.pool.loop
        self.status = 0  # set once the final (non-1xx) response head is in
        self.headers: dict[str, str] = {}
        self.head_ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.got_bytes = False
        self.keep_alive = True
        self.sink: Sink | None = None
        self.body: list[bytes] = []
        self._complete = False  # llhttp has seen the final response's end
        self._until_close = False  # the body has no length: it ends when the connection does
        self._head_size = 0
        self.last_activity = time.monotonic()

    # asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool._forget(self)
        if self.done.done():
            return
        if self.status and self._until_close:
            self._finish()
            return
        why = "engine closed the connection"
        if self.got_bytes:
            why += " before the response ended" if self.status else " mid-head"
        if exc is not None:
            why += f": {exc!r}"
        self._fail((UpstreamError if self.got_bytes else ConnectFailed)(why))

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_activity = time.monotonic()
        if self.done.done():
            # Bytes after a finished response: the connection cannot be trusted any more.
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            self._pieces.clear()
            self._fail(UpstreamError("malformed response: engine switched protocols"))
            return
        except HttpParserError as exc:
            if not self._complete:
                self._pieces.clear()
                # A refusal raised from a callback travels as the parser error's context.
                why = exc.__context__ if isinstance(exc.__context__, UpstreamError) else exc
                self._fail(UpstreamError(f"malformed response: {why}"))
                return
            self.keep_alive = False  # bytes after the response's end
        if self._pieces:
            self._flush()
        if self._complete:
            self._finish()
        elif not self.status:
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                self._fail(UpstreamError("response head too large"))

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost decides what it meant

    # httptools callbacks, run inside feed_data -------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # Stops llhttp before a second response could overwrite this one's state.
            raise UpstreamError("data after the end of the response")
        self.headers.clear()  # a 1xx response's headers do not carry over to the final one

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.status:
            return  # a chunked body's trailer
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 100 Continue, 103 Early Hints...: the final response follows
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise UpstreamError(f"HTTP/{version} is not HTTP/1.x")
        te = self.headers.get("transfer-encoding")
        if te is not None:
            # llhttp refuses both together already; checked again because a leniency flag
            # would reopen request smuggling, and any coding but chunked would reach the
            # client undecoded.
            if "content-length" in self.headers:
                raise UpstreamError("both Content-Length and Transfer-Encoding")
            if te.lower() != "chunked":
                raise UpstreamError(f"unsupported Transfer-Encoding {te!r}")
        self._until_close = te is None and "content-length" not in self.headers
        self.keep_alive = self._parser.should_keep_alive()
        self.status = status
        self.head_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        # Collected and handed on once per read, so a read holding many chunks costs one
        # sink call (one client write) rather than one per chunk.
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self.status:
            self._complete = True

    # delivery -----------------------------------------------------------------------------

    def _flush(self) -> None:
        pieces = self._pieces
        if self.sink is None:
            self.body += pieces
            pieces.clear()
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self.sink(data)

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

    @property
    def complete(self) -> bool:
        """The response's end has been parsed (in a sink: this read is the last)."""
        return self._complete

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
    """Keep-alive connections to every engine, opened on demand and reused. Up to `max_idle`
    idle ones are kept per engine: more than an engine's usual concurrency, so that load
    swinging around it reuses connections instead of closing and reopening them."""

    def __init__(self, connect_timeout: float, read_timeout: float, max_idle: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int, bool], deque[Exchange]] = {}
        self._busy: set[Exchange] = set()
        self._ssl: ssl.SSLContext | None = None
        self._targets: dict[str, tuple[tuple[str, int, bool], str, str]] = {}
        self._watchdog = self.loop.create_task(self._watch())

    async def request(
        self, base_url: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Exchange:
        """Send a POST and wait for the response head. Raises ConnectFailed, ReadTimeout or
        UpstreamError; ConnectFailed means the engine saw nothing and another may be tried."""
        key, prefix, host = self._target(base_url)
        head = [f"POST {prefix}{path} HTTP/1.1", f"Host: {host}",
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

    def _target(self, base_url: str) -> tuple[tuple[str, int, bool], str, str]:
        """`base_url`'s pool key, path prefix and Host header, parsed once."""
        found = self._targets.get(base_url)
        if found is None:
            url = urlsplit(base_url)
            found = self._targets[base_url] = (_key(url), url.path.rstrip("/"), url.netloc)
        return found

    def forget(self, base_url: str) -> None:
        """Close the idle connections to `base_url` (its engine left the fleet)."""
        key = self._targets.pop(base_url, None)
        for ex in self._idle.pop(key[0] if key else _key(urlsplit(base_url)), deque()):
            ex.abort()

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
            raise ConnectFailed(
                f"cannot connect to {host}:{port}: {exc!r}", timed_out=isinstance(exc, TimeoutError)
            ) from exc
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


def _key(url: SplitResult) -> tuple[str, int, bool]:
    tls = url.scheme == "https"
    return url.hostname or "127.0.0.1", url.port or (443 if tls else 80), tls
