"""What each tenant holds at once: requests not yet finished, and bytes of request bodies.

A request takes a `Hold` once its key names its tenant, before its body is read, and gives it
back when it ends, however it ends (the handler's `finally`). `[tenants.NAME] max_concurrent`
bounds the requests a tenant holds (queued, in flight, or still sending their bodies);
`max_body_bytes_in_flight` the body bytes they hold: a body's Content-Length is reserved before
it is read, and bodies of unknown or compressed length as their bytes arrive. Over either limit,
429 with Retry-After. The counts are keyed by tenant name only.
"""

from __future__ import annotations

import sys
import weakref

from aiohttp import web

from gateway.config.schema import Config
from gateway.core.errors import ApiError
from gateway.http.decode import Inflater
from gateway.http.gate import Gate


class Holds:
    """Per tenant: requests held (`requests`) and body bytes reserved (`body_bytes`)."""

    __slots__ = ("__weakref__", "body_bytes", "requests")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.body_bytes: dict[str, int] = {}

    def enter(self, tenant: str, cfg: Config) -> Hold:
        """Hold one request of `tenant`; ApiError 429 when it already holds its limit."""
        limit = cfg.tenants[tenant].max_concurrent
        held = self.requests.get(tenant, 0)
        if limit and held >= limit:
            raise ApiError(
                429,
                f"Tenant '{tenant}' already has {held} requests under way, its limit of "
                f"max_concurrent = {limit}; retry when one has finished.",
                code="concurrency_limit",
                headers={"Retry-After": str(cfg.server.retry_after_s)},
            )
        self.requests[tenant] = held + 1
        return Hold(self, tenant, cfg.tenants[tenant].max_body_bytes_in_flight,
                    cfg.server.retry_after_s)  # fmt: skip


class Hold:
    """One request's hold: the request itself and the body bytes reserved for it."""

    __slots__ = ("_holds", "_limit", "_retry_after", "done", "reserved", "tenant")

    def __init__(self, holds: Holds, tenant: str, limit: int, retry_after: int) -> None:
        self._holds = holds
        self._limit = limit
        self._retry_after = retry_after
        self.tenant = tenant
        self.reserved = 0
        self.done = False

    def reserve(self, n: int) -> None:
        """Hold at least `n` body bytes; ApiError 429 when the tenant's bodies would pass
        its limit (what was reserved before stays reserved until `release`)."""
        more = n - self.reserved
        if more <= 0 or self.done:
            return
        table = self._holds.body_bytes
        held = table.get(self.tenant, 0)
        if self._limit and held + more > self._limit:
            raise ApiError(
                429,
                f"Tenant '{self.tenant}' already holds {held} bytes of request bodies under way;"
                f" this body would pass its limit of max_body_bytes_in_flight = {self._limit}. "
                "Retry when a request has finished.",
                code="body_bytes_limit",
                headers={"Retry-After": str(self._retry_after)},
            )
        table[self.tenant] = held + more
        self.reserved = n

    def release(self) -> None:
        """The request ended: give back the request and its bytes (once)."""
        if self.done:
            return
        self.done = True
        h, tenant = self._holds, self.tenant
        _take(h.requests, tenant, 1)
        _take(h.body_bytes, tenant, self.reserved)
        self.reserved = 0


def _take(table: dict[str, int], tenant: str, n: int) -> None:
    left = table.get(tenant, 0) - n
    if left > 0:
        table[tenant] = left
    else:
        table.pop(tenant, None)


_HOLDS: weakref.WeakKeyDictionary[Gate, Holds] = weakref.WeakKeyDictionary()


def holds_of(gate: Gate) -> Holds:
    """The holds of the gateway that `gate` fronts."""
    holds = _HOLDS.get(gate)
    if holds is None:
        holds = _HOLDS[gate] = Holds()
    return holds


async def read_body(request: web.Request, hold: Hold, encoding: str = "identity") -> bytes:
    """The request's body decoded from `encoding` (identity, gzip or deflate: see
    `gateway.http.decode`), its decoded bytes reserved in `hold` as they arrive; bounded by the
    application's client_max_size as `request.read()` bounds it."""
    max_size = request.client_max_size
    content = request.content
    if max_size:
        content.set_read_chunk_size(max_size)
    inflate = Inflater(encoding) if encoding != "identity" else None
    body = bytearray()
    while chunk := await content.readany():
        if inflate is not None:
            chunk = inflate.feed(chunk, max_size or sys.maxsize)
        body.extend(chunk)
        if max_size and len(body) > max_size:
            raise web.HTTPRequestEntityTooLarge(max_size, len(body))
        hold.reserve(len(body))
    if inflate is not None:
        inflate.finish()
    return bytes(body)
