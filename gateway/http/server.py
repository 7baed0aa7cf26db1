"""The gateway's HTTP connections: aiohttp's, plus a deadline on request heads.

aiohttp closes a connection that sends nothing at all after its keep-alive timeout, but a
client that sends part of a request head and then stalls holds the connection, and a slot in
the gateway's accept queue and memory, for that whole time. `HeadDeadline` gives every request
head `server.head_timeout_s` from its first byte to its last; past that the client gets a 408
(OpenAI-shaped) and the connection closes, as nginx does after `client_header_timeout`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from engines.protocol import error_body


class HeadDeadline(RequestHandler):
    __slots__ = ("_head_deadline", "_head_timer")

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_deadline = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # `_awaiting_head()` and `_cancel_head_timer()` inlined: this runs for every read.
        if self._messages or self._request_in_progress:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and self._head_timer is None:
            loop = asyncio.get_running_loop()
            self._head_timer = loop.call_later(self._head_deadline, self._head_expired)

    def _awaiting_head(self) -> bool:
        """Bytes have come, but no complete request and none being handled: a head is
        incomplete (once a request is complete, its body has its own deadline)."""
        return not self._messages and not self._request_in_progress

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_head():
            return
        body = orjson.dumps(error_body(
            408, f"The request head did not arrive within {self._head_deadline:g} s.",
            code="request_timeout",
        ))  # fmt: skip
        head = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        transport.write(head + body)
        self.force_close()
