"""The OpenAI endpoints and the gateway's own: the request path from a handler's side.

`proxy` is the path of DESIGN.md: authenticate, parse and measure, predict, pass the gate
(admission and the fairness queue), proxy to the engine the gate picked, account.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import structlog
from aiohttp import web
from prometheus_client import generate_latest

from engines.protocol import json_response
from gateway.core.errors import ApiError
from gateway.core.request import Endpoint, RequestInfo
from gateway.fleet.registry import EngineMode
from gateway.http.batch import CLASS_HEADER, DEADLINE_HEADER, request_class
from gateway.http.holds import Hold, holds_of, read_body
from gateway.http.request import (
    INTERACTION_HEADER,
    apply_tenant_policy,
    check_encoding,
    check_headers,
    measure,
    parse_body,
)
from gateway.http.state import GATEWAY, Gateway
from gateway.lengths.features import Record
from gateway.lengths.service import REGIONS_HEADER
from gateway.upstream.proxy import Outcome

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = structlog.get_logger("fairway")


async def _proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    arrival = time.perf_counter()
    # The gateway's own id keys everything internal; the client's X-Request-Id is only echoed
    # and logged, never trusted as a key.
    rid = next(gw.ids)
    given = request.headers.get("X-Request-Id", "")
    client_rid = given if given and _REQUEST_ID.match(given) else None
    out = Outcome(headers={"X-Request-Id": client_rid or rid})
    tenant = app = model = "-"
    predicted: tuple[RequestInfo, Record] | None = None
    hold: Hold | None = None
    try:
        if gw.stopping:
            raise ApiError(503, "The gateway is shutting down; retry on another one.",
                           code="shutting_down",
                           headers={"Retry-After": "1", "Connection": "close"})  # fmt: skip
        principal = gw.keys.authenticate(request.headers.get("Authorization"))
        tenant, app = principal.tenant, principal.app
        # Held from here to the `finally` below, whatever way the request ends.
        hold = holds_of(gw.gate).enter(tenant, gw.cfg)
        interaction = request.headers.get(INTERACTION_HEADER)
        regions = request.headers.get(REGIONS_HEADER)
        check_headers(interaction, regions)
        klass, deadline = request_class(
            gw.cfg.tenants[tenant].apps[app], f"tenants.{tenant}.apps.{app}",
            request.headers.get(CLASS_HEADER), request.headers.get(DEADLINE_HEADER), arrival,
        )  # fmt: skip
        # read_body() decodes gzip and deflate in bounded steps, holds the decoded body to
        # server.max_body_bytes, and reserves its bytes for the tenant as they arrive.
        encoding = check_encoding(request.headers.get("Content-Encoding"))
        if request.content_length is not None:  # reserved before a byte of it is read
            hold.reserve(min(request.content_length, gw.cfg.server.max_body_bytes))
        try:
            if request.content.is_eof():  # the usual case: the body came with the headers
                raw = await read_body(request, hold, encoding)
            else:
                async with asyncio.timeout(gw.cfg.server.body_timeout_s):
                    raw = await read_body(request, hold, encoding)
        except TimeoutError:
            raise ApiError(
                408,
                f"The request body did not arrive within {gw.cfg.server.body_timeout_s:g} s.",
                code="request_timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413,
                f"Request body is larger than the limit of {gw.cfg.server.max_body_bytes} bytes.",
                code="request_too_large",
            ) from None
        except web.RequestPayloadError:
            raise ApiError(
                400,
                f"The request body could not be read as Content-Encoding {encoding}.",
                param="Content-Encoding",
                code="invalid_request",
            ) from None
        body = parse_body(raw, endpoint)
        model = body["model"]
        if not _served(gw, model):
            raise ApiError(
                404,
                f"The model '{model}' does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        apply_tenant_policy(body, endpoint, gw.cfg.tenants[tenant])
        info = measure(body, endpoint, principal, rid, interaction, arrival, klass, deadline)
        if gw.lengths is not None:
            predicted = gw.lengths.annotate(info, body, regions)
            info = predicted[0]
        admitted = await gw.gate.enter(info)
        out.headers = {**admitted.headers, **out.headers}
        out.on_events = lambda n: gw.gate.on_tokens(admitted, n)
        try:

            def reroute(tried: list[str]) -> str | None:
                return gw.gate.reroute(admitted, tried)

            return await gw.proxy.forward(request, info, body, out, admitted.engine, reroute)
        finally:
            usage = out.usage
            await gw.gate.leave(admitted, usage.prompt_tokens, usage.completion_tokens)
    except ApiError as exc:
        out.status = exc.status
        if out.headers:
            exc.headers = {**out.headers, **(exc.headers or {})}
        if out.engine == "-":
            gw.metrics.rejected.labels(tenant, str(exc.status)).inc()
        raise
    except asyncio.CancelledError:
        out.status = 499
        raise
    finally:
        if hold is not None:
            hold.release()
        _account(gw, rid, client_rid, tenant, app, model, out, arrival)
        if predicted is not None and gw.lengths is not None:
            done = out.status == 200 and out.usage.completion_tokens is not None
            gw.lengths.finish(*predicted, out.usage.completion_tokens if done else None,
                              engine=out.engine, ttft=out.ttft,
                              latency=time.perf_counter() - arrival)  # fmt: skip


def _served(gw: Gateway, model: str) -> bool:
    """`model in gw.registry.models`, without building that list for every request."""
    return any(e.mode is EngineMode.ACTIVE for e in gw.registry.engines_of(model))


def _account(gw: Gateway, rid: str, client_rid: str | None, tenant: str, app: str, model: str,
             out: Outcome, arrival: float) -> None:  # fmt: skip
    latency = time.perf_counter() - arrival
    if out.engine != "-":
        m = gw.metrics.of(tenant, model, out.engine)
        m.status(out.status).inc()
        m.latency.observe(latency)
        if out.ttft is not None:
            m.ttft.observe(out.ttft)
        if out.usage.prompt_tokens:
            m.prompt_tokens.inc(out.usage.prompt_tokens)
        completion = out.usage.completion_tokens
        if completion is None and out.events:
            completion = out.events  # engines that send no usage: about a token per event
        if completion:
            m.completion_tokens.inc(completion)
    if not log.is_enabled_for(logging.INFO):
        return  # the line's fields cost more than the filtered call itself
    log.info(
        "request",
        request_id=rid,
        client_request_id=client_rid,
        tenant=tenant,
        app=app,
        model=model,
        engine=out.engine,
        status=out.status,
        attempts=out.attempts,
        prompt_tokens=out.usage.prompt_tokens,
        completion_tokens=out.usage.completion_tokens,
        ttft_ms=None if out.ttft is None else round(out.ttft * 1000, 3),
        latency_ms=round(latency * 1000, 3),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _proxy(request, Endpoint.COMPLETIONS)


async def list_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    gw.keys.authenticate(request.headers.get("Authorization"))
    cards = [
        {"id": m, "object": "model", "created": 0, "owned_by": "fairway"}
        for m in gw.registry.models
    ]
    return json_response({"object": "list", "data": cards})


async def healthz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    models = {m: sum(e.routable for e in gw.registry.engines_of(m)) for m in gw.registry.by_model}
    ok = any(models.values()) and not gw.stopping
    status = "shutting down" if gw.stopping else "ok" if ok else "no healthy engine"
    return json_response({"status": status, "healthy_engines": models}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    for model, policy in gw.gate.dispatcher.policies.items():
        counters = policy.counters()
        for tenant in gw.cfg.tenants:
            gw.metrics.queue_depth.labels(tenant, model).set(policy.backlog(tenant))
            gw.metrics.service.labels(tenant, model).set(counters.get(tenant, 0.0))
    for model, n in gw.gate.core.batch.waiting().items():
        gw.metrics.batch_waiting.labels(model).set(n)
    ledger = gw.gate.core.ledger
    for e in gw.registry.engines.values():
        gw.metrics.in_flight.labels(e.model, e.id, e.region).set(ledger.in_flight(e.id))
        gw.metrics.engine_healthy.labels(e.model, e.id, e.region).set(int(e.healthy))
    body = generate_latest(gw.metrics.registry)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")
