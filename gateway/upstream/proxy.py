"""Proxy: send a request to one engine and relay its answer, streaming or whole.

An engine that cannot be reached before its first byte is ejected and the request tried on
another engine of the same model. Once bytes flow there is no retry: a failure mid-stream ends
the stream with an error event, as vLLM itself does. A client that goes away closes the
upstream connection, which makes the engine abort the request and free its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http import StreamWriter

from engines.protocol import SSE_DONE, error_body, sse_event, sse_headers
from gateway.config.schema import ServerConfig
from gateway.core.errors import ApiError
from gateway.core.request import RequestInfo
from gateway.fleet.registry import EngineRegistry, EngineState
from gateway.obs.metrics import GatewayMetrics
from gateway.upstream.client import (
    ConnectFailed,
    Exchange,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
)
from gateway.upstream.sse import SseRelay, Usage

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first


@dataclass(slots=True)
class Outcome:
    """What happened to one request, for its log line and metrics."""

    engine: str = "-"
    status: int = 0
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    events: int = 0
    ttft: float | None = None
    headers: dict[str, str] = field(default_factory=dict)  # added to the response (and errors)
    on_events: Callable[[int], None] | None = None  # SSE events as they stream


class _SseResponse(web.StreamResponse):
    # Keep the head buffered until the first body write, as aiohttp's own `Response` does:
    # the relay sends it with the first events (or the whole answer) in one write.
    _send_headers_immediately = False


class _TryNext(Exception):
    """This engine failed before sending anything; another one may serve the request."""


class _Answered5xx(_TryNext):
    """This engine answered 5xx: one more engine at most may serve the request."""


def _engine_rejection(status: int, raw: bytes) -> ApiError:
    """An engine's 4xx, reshaped as OpenAI's error body where it is not one already."""
    message, param, code = raw.decode(errors="replace")[:2000] or "engine error", None, None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        inner = obj.get("error")
        err: dict[str, Any] = inner if isinstance(inner, dict) else obj
        message = str(err.get("message", message))
        param = err.get("param") if isinstance(err.get("param"), str) else None
        code = err.get("code") if isinstance(err.get("code"), str) else None
    return ApiError(status, message, param=param, code=code)


class Proxy:
    def __init__(
        self,
        registry: EngineRegistry,
        pool: UpstreamPool,
        metrics: GatewayMetrics,
        server: ServerConfig,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.server = server
        self.log = structlog.get_logger("fairway.proxy")
        self.live: dict[str, set[Exchange]] = {}  # per engine, exchanges under way
        self._ended: dict[Exchange, str] = {}  # exchanges the gateway ended, and why

    def abort_engine(self, engine_id: str, why: str) -> int:
        """End every exchange under way at `engine_id` (it is leaving the fleet, or the gateway
        is stopping): streams end with an error event saying `why`, whole responses with a 502.
        Returns how many were ended."""
        live = self.live.pop(engine_id, set())
        for ex in live:
            self._ended[ex] = why
            ex.abort()
        return len(live)

    def _no_engine(self, model: str, tried: int) -> ApiError:
        why = f"after {tried} failed attempt(s)" if tried else "right now"
        return ApiError(
            503,
            f"No healthy engine can serve model '{model}' {why}; retry shortly.",
            code="no_healthy_engine",
            headers={"Retry-After": str(self.server.retry_after_s)},
        )

    async def forward(
        self,
        request: web.Request,
        info: RequestInfo,
        body: dict[str, Any],
        out: Outcome,
        engine_id: str,
        reroute: Callable[[list[str]], str | None],
    ) -> web.StreamResponse:
        """Relay `info` to engine `engine_id` (the gate's pick, charged there); when an engine
        fails before answering, `reroute(tried)` moves the charge to another one."""
        if info.stream:
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts or {}), "include_usage": True}
        payload = orjson.dumps(body)
        tried: list[str] = []
        current: str | None = engine_id
        limit = self.server.max_attempts
        while current is not None and out.attempts < limit:
            engine = self.registry.engines.get(current)
            tried.append(current)
            if engine is not None:
                out.attempts += 1
                out.engine = engine.id
                try:
                    return await self._attempt(request, info, engine, payload, out)
                except _Answered5xx:
                    limit = min(limit, out.attempts + 1)  # a 5xx: one more engine, no more
                except _TryNext:
                    pass
            current = reroute(tried)
        raise self._no_engine(info.model, out.attempts)

    async def _attempt(
        self,
        request: web.Request,
        info: RequestInfo,
        engine: EngineState,
        payload: bytes,
        out: Outcome,
    ) -> web.StreamResponse:
        # Unique per attempt, so an engine's own logs tell retries apart.
        headers = {"Content-Type": "application/json",
                   "X-Request-Id": f"{info.id}-{out.attempts}"}  # fmt: skip
        if engine.api_key:
            headers["Authorization"] = f"Bearer {engine.api_key}"
        try:
            ex = await self.pool.request(engine.url, info.endpoint.path, payload, headers)
        except ConnectFailed as exc:
            self._connect_failed(info, engine, exc)
            raise _TryNext from exc
        except ReadTimeout:
            out.status = 504
            self._count_error(info, engine, "timeout")
            raise ApiError(
                504, f"engine {engine.id} did not answer in time", code="upstream_timeout"
            ) from None
        except UpstreamError as exc:
            out.status = 502
            self._count_error(info, engine, "protocol")
            message = f"engine {engine.id} failed: {exc}"
            raise ApiError(502, message, code="upstream_error") from None
        live = self.live.setdefault(engine.id, set())
        live.add(ex)
        try:
            if ex.status >= 500:
                self._count_error(info, engine, "http_5xx")
                self.log.warning(
                    "engine_error", engine=engine.id, status=ex.status, request_id=info.id
                )
                self._answered_5xx(engine, ex.status)
                raise _Answered5xx
            if self.registry.answered(engine):
                self.log.info("engine_breaker_closed", engine=engine.id)
            if ex.status != 200:
                out.status = ex.status
                raise _engine_rejection(ex.status, await self._read(ex, info, engine, out))
            if info.stream:
                return await self._relay_stream(request, info, engine, ex, out)
            return await self._relay_whole(info, engine, ex, out)
        finally:
            if (
                ex.status < 500
                and ex.done.done()
                and not ex.done.cancelled()
                and ex.done.exception() is None
            ):
                engine.completed_at = time.monotonic()
            live.discard(ex)
            self._ended.pop(ex, None)
            self.pool.done_with(ex)

    def _count_error(self, info: RequestInfo, engine: EngineState, kind: str) -> None:
        self.metrics.upstream_errors.labels(info.tenant, info.model, engine.id, kind).inc()

    def _answered_5xx(self, engine: EngineState, status: int) -> None:
        half_open = engine.half_open
        if self.registry.answered_5xx(engine, self.server.http_5xx_eject_after):
            self.metrics.engine_healthy.labels(engine.model, engine.id, engine.region).set(0)
            reason = (f"HTTP {status} while half-open" if half_open
                      else f"{engine.http_5xx} consecutive 5xx answers")  # fmt: skip
            self.log.warning("engine_ejected", engine=engine.id, reason=reason)

    def _connect_failed(self, info: RequestInfo, engine: EngineState, exc: ConnectFailed) -> None:
        self._count_error(info, engine, "connect")
        # A connection not made in time to an engine that finished a request a moment ago is
        # the load (its accept queue, or this loop), not a dead engine: the request tries the
        # next engine, and the engine stays. Refused connections eject at once.
        alive_within = self.server.connect_timeout_s + self.server.health_interval_s
        if exc.timed_out and time.monotonic() - engine.completed_at < alive_within:
            self.log.info("engine_connect_slow", engine=engine.id, reason=str(exc))
            return
        if self.registry.connect_failed(engine):
            self.metrics.engine_healthy.labels(engine.model, engine.id, engine.region).set(0)
            self.log.warning("engine_ejected", engine=engine.id, reason=str(exc))

    async def _read(
        self, ex: Exchange, info: RequestInfo, engine: EngineState, out: Outcome
    ) -> bytes:
        try:
            return await ex.read()
        except UpstreamError as exc:
            self._mid_stream_failure(info, engine, exc, out)
            raise ApiError(
                502, f"engine {engine.id} failed mid-response", code="upstream_error"
            ) from None

    async def _relay_whole(
        self, info: RequestInfo, engine: EngineState, ex: Exchange, out: Outcome
    ) -> web.Response:
        raw = await self._read(ex, info, engine, out)
        try:
            out.usage.read(orjson.loads(raw))
        except orjson.JSONDecodeError:
            self._count_error(info, engine, "bad_body")
            raise ApiError(
                502, f"engine {engine.id} sent an invalid body", code="upstream_error"
            ) from None
        out.status = 200
        return web.Response(
            body=raw,
            content_type="application/json",
            headers={**out.headers, "X-Fairway-Engine": engine.id},
        )

    async def _relay_stream(
        self,
        request: web.Request,
        info: RequestInfo,
        engine: EngineState,
        ex: Exchange,
        out: Outcome,
    ) -> web.StreamResponse:
        resp = _SseResponse(
            headers={
                **sse_headers(),
                **out.headers,
                "X-Fairway-Engine": engine.id,
            }
        )
        try:
            await resp.prepare(request)
        except ConnectionResetError:
            out.status = CLIENT_CLOSED
            return resp
        writer, transport = request.writer, request.transport
        if transport is None or transport.is_closing():
            out.status = CLIENT_CLOSED
            return resp
        if self.server.send_buffer_bytes:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                    self.server.send_buffer_bytes)  # fmt: skip
        # aiohttp frames an HTTP/1.0 response by closing the connection, never by chunks.
        relay = SseRelay(transport, info, ex, out.usage, chunked=request.version >= (1, 1))
        relay.on_events = out.on_events
        # What the engine sent with its head goes out with ours, in one write; a whole answer
        # already in (short answers from a fast engine) goes out with the end, in one write.
        relay.hold()
        ex.stream(relay.feed)
        try:
            if not ex.done.done():
                # Headers go out now; body chunks are then written straight to the socket.
                first = relay.release()
                if isinstance(writer, StreamWriter):
                    if first:
                        await writer.write(first, drain=False)
                    else:
                        writer.send_headers()
                elif first:
                    await resp.write(first)
            while True:
                await relay.wait()
                if relay.paused and not relay.client_gone:
                    try:
                        async with asyncio.timeout(self.server.send_timeout_s):
                            await writer.drain()
                    except TimeoutError:
                        self._stalled(info, engine, relay, ex, transport)
                        break
                    relay.paused = False
                    ex.resume()
                    continue
                break
        except ConnectionResetError:  # the client left while we waited for it to drain
            relay.client_gone = True
            ex.abort()
        except asyncio.CancelledError:
            out.status = CLIENT_CLOSED
            ex.abort()
            raise
        finally:
            out.ttft, out.events = relay.ttft, relay.events
        if transport.is_closing():
            relay.client_gone = True  # before the held events could go out
        if relay.client_gone:
            out.status = CLIENT_CLOSED
            return resp
        exc = ex.done.exception()
        relay.hold()  # the rest goes out with the final chunk
        if exc is None:
            relay.flush()
            out.status = 200
        else:
            message = self._ended.pop(ex, None)
            if message is None:
                self._mid_stream_failure(info, engine, exc, out)
                message = f"engine {engine.id} failed mid-stream"
            else:
                out.status = 502
                self.log.warning("stream_ended", engine=engine.id, request_id=info.id,
                                 reason=message)  # fmt: skip
            relay.write(sse_event(error_body(502, message, code="upstream_error")) + SSE_DONE)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof(relay.release())
        return resp

    def _stalled(self, info: RequestInfo, engine: EngineState, relay: SseRelay, ex: Exchange,
                 transport: asyncio.Transport) -> None:  # fmt: skip
        """The client read nothing for `send_timeout_s`: cut its stream and free the slot."""
        relay.client_gone = True
        ex.abort()
        transport.abort()  # what is buffered for it would never drain
        self.metrics.dropped.labels(info.tenant, "send_timeout").inc()
        self.log.warning("client_send_timeout", engine=engine.id, request_id=info.id,
                         events=relay.events, timeout_s=self.server.send_timeout_s)  # fmt: skip

    def _mid_stream_failure(
        self, info: RequestInfo, engine: EngineState, exc: BaseException, out: Outcome
    ) -> None:
        out.status = 502
        kind = "timeout" if isinstance(exc, ReadTimeout) else "mid_stream"
        self._count_error(info, engine, kind)
        self.log.warning(
            "engine_failed_mid_stream", engine=engine.id, request_id=info.id, reason=str(exc)
        )
