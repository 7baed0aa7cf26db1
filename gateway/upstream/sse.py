"""Relaying an engine's SSE stream to the client, one engine read at a time.

`SseRelay.feed` runs inside the upstream connection's `data_received`: it cuts the bytes at
the last complete event, records usage, hides the usage chunk from a client that did not ask
for it, and writes the rest to the client's socket as one HTTP chunk. No buffering beyond an
incomplete event, no task switch per token. Only what the engine sent with its response head,
and its last read, are held back (`hold`), to go out in one write with the client's response
head and with the final chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from engines.protocol import sse_event
from gateway.core.request import RequestInfo
from gateway.upstream.client import Exchange

# Above this many bytes queued for a slow client, stop reading from the engine until it drains.
HIGH_WATER = 256 * 1024


class Usage:
    __slots__ = ("completion_tokens", "prompt_tokens")

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def read(self, obj: Any) -> None:
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int):
                self.prompt_tokens = p
            if isinstance(c, int):
                self.completion_tokens = c


def filter_event(event: bytes, client_usage: bool, usage: Usage) -> bytes | None:
    """Record usage from one SSE event; hide it from a client that did not ask for it."""
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return event
    try:
        obj = orjson.loads(event.removeprefix(b"data:").strip())
    except orjson.JSONDecodeError:
        return event
    usage.read(obj)
    if client_usage or not isinstance(obj, dict):
        return event
    if not obj.get("choices"):
        return None  # the usage-only chunk we asked for on the client's behalf
    obj.pop("usage", None)
    return sse_event(obj)


def filter_events(block: bytes, client_usage: bool, usage: Usage) -> bytes:
    """`filter_event` on each event of `block` that names usage; the others are copied as they
    are, unparsed (usage is in the last chunk only, or with continuous usage stats in each)."""
    out: list[bytes] = []
    copied = 0  # block[:copied] is in `out` already
    at = block.find(b'"usage"')
    while at >= 0:
        begin = block.rfind(b"\n\n", copied, at) + 2
        begin = copied if begin == 1 else begin
        end = block.find(b"\n\n", at)
        end = len(block) if end < 0 else end + 2
        out.append(block[copied:begin])
        kept = filter_event(block[begin:end], client_usage, usage)
        if kept is not None:
            out.append(kept)
        copied = end
        at = block.find(b'"usage"', copied)
    out.append(block[copied:])
    return b"".join(out)


class SseRelay:
    """The sink an upstream exchange streams into; see the module docstring."""

    def __init__(
        self,
        transport: asyncio.Transport,
        info: RequestInfo,
        exchange: Exchange,
        usage: Usage,
        chunked: bool = True,
    ) -> None:
        self.transport = transport
        # HTTP/1.1 responses are chunked; an HTTP/1.0 client gets the bytes as they are and the
        # end of the stream is the connection closing.
        self.chunked = chunked
        self.info = info
        self.exchange = exchange
        self.usage = usage
        self.pending = b""
        self.held: list[bytes] | None = None  # output kept for the next write of the response
        self.events = 0
        self.ttft: float | None = None
        self.client_gone = False
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.on_events: Callable[[int], None] | None = None  # output as it streams

    def feed(self, data: bytes) -> None:
        if self.pending:
            data = self.pending + data
        end = data.rfind(b"\n\n") + 2
        if end == 1:  # no complete event yet
            self.pending = data
            return
        if end == len(data):
            self.pending = b""
        else:
            data, self.pending = data[:end], data[end:]
        if b'"usage"' in data:
            data = filter_events(data, self.info.include_usage, self.usage)
            if not data:
                return
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.info.arrival
        n = data.count(b"\n\n")
        self.events += n
        if self.on_events is not None:
            self.on_events(n)
        if self.exchange.complete:
            self.hold()  # the engine's last read: it goes out with the final chunk
        self.write(data)

    def hold(self) -> None:
        """Keep what is written from now on, for `release`."""
        if self.held is None:
            self.held = []

    def release(self) -> bytes:
        """What was held, unframed; writes go to the client's socket again."""
        held, self.held = self.held, None
        return b"".join(held) if held else b""

    def write(self, data: bytes) -> None:
        """Write `data` to the client: one HTTP/1.1 chunk, or as it is for HTTP/1.0."""
        if self.held is not None:
            self.held.append(data)
            return
        t = self.transport
        if t.is_closing():
            self.client_gone = True
            self.exchange.abort()  # the engine sees the connection drop and aborts
            self._wake()
            return
        t.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if not self.paused and t.get_write_buffer_size() > HIGH_WATER:
            self.paused = True
            self.exchange.pause()
            self._wake()

    def flush(self) -> None:
        """Whatever is left after the engine's last byte (a final event without a blank line)."""
        if self.pending.strip():
            data, self.pending = self.pending, b""
            self.write(data)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        """Until the exchange ends, or the relay needs the client to drain."""
        if self.paused or self.client_gone or self.exchange.done.done():
            return
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        wake = self._on_done
        self.exchange.done.add_done_callback(wake)
        try:
            await waiter
        finally:
            self.exchange.done.remove_done_callback(wake)
            self.waiter = None

    def _on_done(self, _: object) -> None:
        self._wake()
