"""Every error leaves the gateway OpenAI-shaped: `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from engines.protocol import error_response
from gateway.core.errors import ApiError

log = structlog.get_logger("fairway")


def render(exc: ApiError) -> web.Response:
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code,
                          headers=exc.headers)  # fmt: skip


@web.middleware
async def openai_errors(
    request: web.Request, handler: aiohttp.typedefs.Handler
) -> web.StreamResponse:
    """Every error leaves as `{"error": {...}}`, whatever layer raised it."""
    try:
        return await handler(request)
    except ApiError as exc:
        return render(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        if exc.status == 404:
            message = f"Unknown endpoint {request.method} {request.path}"
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        return error_response(exc.status, message, headers=headers)
    except Exception:
        # A bug, not the client's fault: log it whole, tell the client nothing internal.
        log.exception("unhandled_error", path=request.path)
        return error_response(500, "Internal error in the gateway.", code="internal_error")
