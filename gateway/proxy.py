"""Proxy: send a request to one engine and relay its answer, streaming or whole.

An engine that cannot be reached before its first byte is ejected and the request tried on
another engine of the same model. Once bytes flow there is no retry: a failure mid-stream ends
the stream with an error event, as vLLM itself does. A client that goes away closes the
upstream connection, which makes the engine abort the request and free its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from engines.protocol import SSE_DONE, error_body, sse_event, sse_headers
from engines.registry import EngineRegistry, EngineState
from gateway.config import ServerConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.request import RequestInfo
from gateway.routing import RoutingPolicy

CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first
MAX_ERROR_BODY = 64 * 1024


@dataclass(slots=True)
class Outcome:
    """What happened to one request, for its log line and metrics."""

    engine: str = "-"
    status: int = 0
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    ttft: float | None = None


class _TryNext(Exception):
    """This engine failed before sending anything; another one may serve the request."""


class _ClientGone(Exception):
    """The client closed its connection while we were writing to it."""


async def _write(resp: web.StreamResponse, data: bytes) -> None:
    # aiohttp raises ClientConnectionResetError (a ClientConnectionError too) when the
    # client's socket is gone; tell it apart from an engine failing.
    try:
        await resp.write(data)
    except ConnectionResetError as exc:
        raise _ClientGone from exc


def _read_usage(obj: Any, out: Outcome) -> None:
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int):
            out.prompt_tokens = p
        if isinstance(c, int):
            out.completion_tokens = c


def _filter_event(event: bytes, client_usage: bool, out: Outcome) -> bytes | None:
    """Record usage from an SSE event; hide it from a client that did not ask for it."""
    if b'"usage":{' not in event and b'"usage": {' not in event:
        return event
    try:
        obj = orjson.loads(event.removeprefix(b"data:").strip())
    except orjson.JSONDecodeError:
        return event
    _read_usage(obj, out)
    if client_usage or not isinstance(obj, dict):
        return event
    if not obj.get("choices"):
        return None  # the usage-only chunk we asked for on the client's behalf
    obj.pop("usage", None)
    return sse_event(obj)


def _upstream_error(status: int, raw: bytes) -> ApiError:
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
        policy: RoutingPolicy,
        session: aiohttp.ClientSession,
        metrics: GatewayMetrics,
        server: ServerConfig,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.session = session
        self.metrics = metrics
        self.server = server
        self.log = structlog.get_logger("fairway.proxy")
        self.timeout = aiohttp.ClientTimeout(
            total=server.request_timeout_s, sock_connect=server.connect_timeout_s
        )

    def _no_engine(self, model: str, tried: int) -> ApiError:
        why = f"after {tried} failed attempt(s)" if tried else "right now"
        return ApiError(
            503,
            f"No healthy engine can serve model '{model}' {why}; retry shortly.",
            code="no_healthy_engine",
            headers={"Retry-After": str(self.server.retry_after_s)},
        )

    async def forward(
        self, request: web.Request, info: RequestInfo, body: dict[str, Any], out: Outcome
    ) -> web.StreamResponse:
        if info.stream:
            opts = body.get("stream_options")
            body["stream_options"] = {**(opts or {}), "include_usage": True}
        payload = orjson.dumps(body)
        tried: list[str] = []
        while out.attempts < self.server.max_attempts:
            engines = self.registry.snapshots(info.model, exclude=tried)
            if not engines:
                break
            engine = self.registry.engines[self.policy.choose(info, engines)]
            tried.append(engine.id)
            out.attempts += 1
            out.engine = engine.id
            try:
                return await self._attempt(request, info, engine, payload, out)
            except _TryNext:
                continue
        raise self._no_engine(info.model, len(tried))

    async def _attempt(
        self,
        request: web.Request,
        info: RequestInfo,
        engine: EngineState,
        payload: bytes,
        out: Outcome,
    ) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": info.id}
        if engine.api_key:
            headers["Authorization"] = f"Bearer {engine.api_key}"
        engine.in_flight += 1
        engine.in_flight_prompt_tokens += info.prompt_tokens
        try:
            try:
                upstream = await self.session.post(
                    engine.url + info.endpoint.path,
                    data=payload,
                    headers=headers,
                    timeout=self.timeout,
                )
            except (aiohttp.ClientConnectionError, aiohttp.ConnectionTimeoutError) as exc:
                self._connect_failed(engine, exc)
                raise _TryNext from exc
            except TimeoutError:
                out.status = 504
                raise ApiError(
                    504, f"engine {engine.id} did not answer in time", code="upstream_timeout"
                ) from None
            try:
                if upstream.status >= 500:
                    self.metrics.upstream_errors.labels(info.model, engine.id, "http_5xx").inc()
                    self.log.warning(
                        "engine_error", engine=engine.id, status=upstream.status, request_id=info.id
                    )
                    raise _TryNext
                if upstream.status != 200:
                    raw = await upstream.content.read(MAX_ERROR_BODY)
                    out.status = upstream.status
                    raise _upstream_error(upstream.status, raw)
                if info.stream:
                    return await self._relay_stream(request, info, engine, upstream, out)
                return await self._relay_whole(info, engine, upstream, out)
            finally:
                # close(), not release(): an unfinished body must not go back to the pool,
                # and dropping the connection is how the engine learns to abort.
                if upstream.content.at_eof():
                    upstream.release()
                else:
                    upstream.close()
        finally:
            engine.in_flight -= 1
            engine.in_flight_prompt_tokens -= info.prompt_tokens

    def _connect_failed(self, engine: EngineState, exc: BaseException) -> None:
        self.metrics.upstream_errors.labels(engine.model, engine.id, "connect").inc()
        if self.registry.connect_failed(engine):
            self.metrics.engine_healthy.labels(engine.model, engine.id, engine.region).set(0)
            self.log.warning("engine_ejected", engine=engine.id, reason=repr(exc))

    async def _relay_whole(
        self,
        info: RequestInfo,
        engine: EngineState,
        upstream: aiohttp.ClientResponse,
        out: Outcome,
    ) -> web.Response:
        try:
            raw = await upstream.read()
            obj = orjson.loads(raw)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self._mid_stream_failure(info, engine, exc, out)
            raise ApiError(
                502, f"engine {engine.id} failed mid-response", code="upstream_error"
            ) from None
        except orjson.JSONDecodeError:
            self.metrics.upstream_errors.labels(info.model, engine.id, "bad_body").inc()
            raise ApiError(
                502, f"engine {engine.id} sent an invalid body", code="upstream_error"
            ) from None
        _read_usage(obj, out)
        out.status = 200
        return web.Response(
            body=raw,
            content_type="application/json",
            headers={"X-Request-Id": info.id, "X-Fairway-Engine": engine.id},
        )

    async def _relay_stream(
        self,
        request: web.Request,
        info: RequestInfo,
        engine: EngineState,
        upstream: aiohttp.ClientResponse,
        out: Outcome,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={**sse_headers(), "X-Request-Id": info.id, "X-Fairway-Engine": engine.id}
        )
        try:
            try:
                await resp.prepare(request)
            except ConnectionResetError as exc:
                raise _ClientGone from exc
            buf = b""
            async for data in upstream.content.iter_any():
                buf += data
                events: list[bytes] = []
                while (end := buf.find(b"\n\n")) != -1:
                    event = buf[: end + 2]
                    buf = buf[end + 2 :]
                    kept = _filter_event(event, info.include_usage, out)
                    if kept is not None:
                        events.append(kept)
                if not events:
                    continue
                if out.ttft is None:
                    out.ttft = time.perf_counter() - info.arrival
                out.chunks += len(events)
                await _write(resp, b"".join(events) if len(events) > 1 else events[0])
            if buf.strip():
                await _write(resp, buf)
            out.status = 200
            await resp.write_eof()
        except _ClientGone:
            out.status = CLIENT_CLOSED
        except asyncio.CancelledError:
            out.status = CLIENT_CLOSED
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self._mid_stream_failure(info, engine, exc, out)
            message = f"engine {engine.id} failed mid-stream"
            event = sse_event(error_body(502, message, code="upstream_error"))
            with contextlib.suppress(ConnectionResetError):
                await resp.write(event + SSE_DONE)
        return resp

    def _mid_stream_failure(
        self, info: RequestInfo, engine: EngineState, exc: BaseException, out: Outcome
    ) -> None:
        out.status = 502
        self.metrics.upstream_errors.labels(info.model, engine.id, "mid_stream").inc()
        self.log.warning("engine_failed_mid_stream", engine=engine.id, request_id=info.id,
                         reason=repr(exc))  # fmt: skip
