"""`fairway serve`: run the gateway until SIGTERM or SIGINT, then stop without losing streams.

On the signal, readiness (`/healthz`) turns 503 at once and new requests get 503 with
`Connection: close` (so a load balancer stops sending; the socket keeps listening meanwhile, so
that its probes see the 503 rather than a refused connection), and the requests under way run
on for up to `server.shutdown_timeout_s`. What still runs then is ended: streams get an error event
and `data: [DONE]`, whole responses a 502, requests still queued a 503. The process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import signal

import structlog
from aiohttp import web

from gateway.http.server import HeadDeadline
from gateway.http.state import GATEWAY, Gateway

log = structlog.get_logger("fairway")
KEEPALIVE_S = 75.0  # an idle keep-alive connection is closed after this long (nginx's default)


def busy(gw: Gateway) -> int:
    """Requests admitted and not yet finished, queued or in flight."""
    return len(gw.gate.core.slots) + sum(len(s) for s in gw.proxy.live.values())


async def _until(gw: Gateway, deadline: float) -> None:
    # Requests end in many places (finish, cancel, abort): polling a count 20 times a second,
    # only while stopping, is simpler than an event from each of them.
    loop = asyncio.get_running_loop()
    while busy(gw) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _tune_gc() -> None:
    """Once serving: what start-up built (config, modules, the predictor's model, metrics)
    is moved out of the cyclic collector's sight, and young objects are collected less
    often. At 512 saturated streams the collector otherwise took about a fifth of the
    process's CPU, its full passes re-scanning every start-up object (benchmarks/
    gateway_overhead.py); a request's own objects are mostly freed by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


async def serve(
    app: web.Application, host: str, port: int, backlog: int, *, reuse_port: bool = False
) -> None:
    """Serve `app` on `host:port` until SIGTERM or SIGINT; see the module docstring.
    `reuse_port`: share the port with other workers (SO_REUSEPORT)."""
    loop = asyncio.get_running_loop()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    listening: asyncio.Server | None = None
    try:
        server = runner.server
        assert server is not None
        head_timeout = app[GATEWAY].cfg.server.head_timeout_s

        def connection() -> HeadDeadline:
            # access_log=None: no access log line (the gateway logs each request itself).
            # auto_decompress=False: bodies are decoded by the handler (gateway.http.decode).
            return HeadDeadline(server, loop=loop, head_timeout=head_timeout,
                                keepalive_timeout=KEEPALIVE_S, access_log=None,
                                auto_decompress=False)  # fmt: skip

        listening = await loop.create_server(connection, host, port, backlog=backlog,
                                             reuse_address=True,
                                             reuse_port=reuse_port or None)  # fmt: skip
        if app[GATEWAY].cfg.server.tune_gc:
            _tune_gc()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        gw = app[GATEWAY]
        gw.stopping = True
        timeout = gw.cfg.server.shutdown_timeout_s
        log.info("stopping", in_flight=busy(gw), deadline_s=timeout)
        await _until(gw, loop.time() + timeout)
        if busy(gw):
            why = "The gateway is shutting down; this response was cut short."
            ended = sum(gw.proxy.abort_engine(e, why) for e in list(gw.proxy.live))
            queued = gw.gate.fail_waiting("The gateway is shutting down; retry on another one.")
            log.warning("stopping_deadline", ended=ended, queued=queued)
            await _until(gw, loop.time() + 2.0)  # their handlers write the endings
        log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if listening is not None:
            listening.close()
        await runner.cleanup()
