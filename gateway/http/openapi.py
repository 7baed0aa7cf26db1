"""The gateway's OpenAPI 3.1 description, served at `GET /openapi.json`.

`python -m gateway.http.openapi > docs/openapi.json` writes the copy kept in the repository;
a test checks that it is up to date. Request bodies describe what `gateway.http.request`
validates (anything else is passed to the engine as it is); every error is OpenAI-shaped.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import orjson
from aiohttp import web

from gateway.http.openapi_parts import (
    _CHOICE,
    _CONTENT_PART,
    _ENGINE,
    _ERRORS,
    _HEADERS,
    _MESSAGE,
    _NEW_ENGINE,
    _PROMPT,
    _USAGE,
    DEMAND,
    MINUTES,
    Schema,
    _completion,
    _error_response,
    _errors,
    _json,
    _ref,
    _request,
)


def _generate(op_id: str, summary: str, body: str, answer: str) -> Schema:
    return {
        "operationId": op_id,
        "summary": summary,
        "tags": ["openai"],
        "security": [{"TenantKey": []}],
        "parameters": _HEADERS,
        "requestBody": {"required": True, "content": _json(_ref("schemas", body))},
        "responses": {
            "200": {
                "description": "The answer; a stream of server-sent events with `stream: true`, "
                "ending with `data: [DONE]`.",
                "content": {
                    **_json(_ref("schemas", answer)),
                    "text/event-stream": {"schema": _ref("schemas", "ServerSentEvent")},
                },
            },
            **_errors(
                "BadRequest",
                "Unauthorized",
                "NotFound",
                "RequestTimeout",
                "PayloadTooLarge",
                "TooManyRequests",
                "BadGateway",
                "ServiceUnavailable",
                "GatewayTimeout",
            ),
        },
    }


def _admin(op_id: str, summary: str, responses: dict[str, Schema], **more: Any) -> Schema:
    return {
        "operationId": op_id,
        "summary": summary,
        "tags": ["admin"],
        "security": [{"AdminKey": []}],
        **more,
        "responses": {**responses, **_errors("Unauthorized")},
    }


def _ok(description: str, schema: Schema, status: str = "200") -> dict[str, Schema]:
    return {status: {"description": description, "content": _json(schema)}}


_ENGINE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The engine's id (it may contain `/`).",
    "schema": {"type": "string", "minLength": 1},
}
_DEADLINE = {
    "name": "timeout_s",
    "in": "query",
    "required": False,
    "description": "Seconds before requests still running are ended (default "
    "`server.drain_timeout_s`).",
    "schema": {"type": "number", "minimum": 0, "maximum": 86400},
}


def document() -> dict[str, Any]:
    """The OpenAPI document of every endpoint of the gateway."""
    ref = _ref
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": _generate(
                "createChatCompletion",
                "A chat completion, proxied to an engine of the model",
                "ChatCompletionRequest",
                "ChatCompletion",
            )
        },
        "/v1/completions": {
            "post": _generate(
                "createCompletion",
                "A text completion, proxied to an engine of the model",
                "CompletionRequest",
                "Completion",
            )
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The models the fleet serves",
                "tags": ["openai"],
                "security": [{"TenantKey": []}],
                "responses": {
                    **_ok("The models", ref("schemas", "ModelList")),
                    **_errors("Unauthorized"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Healthy engines per model",
                "tags": ["gateway"],
                "security": [],
                "responses": {
                    **_ok("At least one engine is healthy", ref("schemas", "Health")),
                    **_ok(
                        "No healthy engine at all, or shutting down",
                        ref("schemas", "Health"),
                        "503",
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "tags": ["gateway"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["gateway"],
                "security": [],
                "responses": {**_ok("OpenAPI 3.1", {"type": "object"}), **_errors()},
            }
        },
        "/admin/tenants": {
            "get": _admin(
                "adminTenants",
                "Weights, service counters, token buckets, queues and engine load, live",
                _ok("Tenants and engine load", ref("schemas", "Tenants")),
            )
        },
        "/admin/demand": {
            "get": _admin(
                "adminDemand",
                "Requests and tokens per minute per (model, region, class): the planner's input",
                {**_ok("The recent series", ref("schemas", "Demand")), **_errors("BadRequest")},
                parameters=[MINUTES],
            )
        },
        "/admin/engines": {
            "get": _admin(
                "listEngines",
                "Every engine of the fleet",
                _ok("The fleet", ref("schemas", "EngineList")),
            ),
            "post": _admin(
                "addEngine",
                "Add an engine to the fleet",
                {
                    **_ok("It joined the fleet", ref("schemas", "Engine"), "201"),
                    **_errors("BadRequest", "Conflict", "PayloadTooLarge"),
                },
                requestBody={"required": True, "content": _json(ref("schemas", "NewEngine"))},
            ),
        },
        "/admin/engines/{id}/drain": {
            "post": _admin(
                "drainEngine",
                "No new requests; it leaves when its last one ends, or at the deadline",
                {
                    **_ok("Draining", ref("schemas", "Engine"), "202"),
                    **_errors("BadRequest", "NotFound"),
                },
                parameters=[_ENGINE_ID, _DEADLINE],
            )
        },
        "/admin/engines/{id}": {
            "delete": _admin(
                "removeEngine",
                "Drain, then remove",
                {
                    **_ok("It was idle and is gone", ref("schemas", "Engine")),
                    **_ok(
                        "Draining; it leaves when its last request ends",
                        ref("schemas", "Engine"),
                        "202",
                    ),
                    **_errors("BadRequest", "NotFound"),
                },
                parameters=[_ENGINE_ID, _DEADLINE],
            )
        },
        "/admin/reload": {
            "post": _admin(
                "reload",
                "Re-read the config file, as SIGHUP does",
                {
                    **_ok("Applied; what changed", ref("schemas", "ReloadResult")),
                    "400": {
                        "description": "The file is invalid (or the gateway was not started "
                        "from one); nothing was changed",
                        "content": _json(ref("schemas", "ReloadError")),
                    },
                },
            )
        },
    }
    schemas: dict[str, Schema] = {
        "Error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        },
        "ErrorResponse": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": ref("schemas", "Error")},
        },
        "ChatMessage": _MESSAGE,
        "ContentPart": _CONTENT_PART,
        "ChatCompletionRequest": _request(
            ["model", "messages"],
            {"messages": {"type": "array", "minItems": 1, "items": ref("schemas", "ChatMessage")}},
            "A chat completion request.",
        ),
        "CompletionRequest": _request(
            ["model", "prompt"],
            {"prompt": _PROMPT},
            "A completion request: the prompt is a string, strings, or token ids.",
        ),
        "Usage": _USAGE,
        "ServerSentEvent": {
            "type": "object",
            "description": "One event of a stream: `data` holds a JSON chunk, `[DONE]` last.",
            "required": ["data"],
            "properties": {
                "data": {"type": "string"},
                "event": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        },
        "ChatCompletion": _completion("chat.completion", _CHOICE),
        "Completion": _completion("text_completion", _CHOICE),
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "healthy_engines"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "no healthy engine", "shutting down"]},
                "healthy_engines": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        "Tenants": {
            "type": "object",
            "required": ["policy", "tenants", "engines"],
            "properties": {
                "policy": {"type": "string"},
                "tenants": {"type": "object", "additionalProperties": {"type": "object"}},
                "engines": {"type": "object", "additionalProperties": {"type": "object"}},
            },
        },
        "Engine": _ENGINE,
        "Demand": DEMAND,
        "EngineList": {
            "type": "object",
            "required": ["engines"],
            "properties": {"engines": {"type": "array", "items": ref("schemas", "Engine")}},
        },
        "NewEngine": _NEW_ENGINE,
        "ReloadResult": {
            "type": "object",
            "required": ["status", "errors"],
            "properties": {
                "status": {"const": "ok"},
                "errors": {"type": "array", "items": {"type": "string"}},
                "engines": {
                    "type": "object",
                    "properties": {
                        k: {"type": "array", "items": {"type": "string"}}
                        for k in ("added", "removed", "changed")
                    },
                },
                "restart_required": {"type": "array", "items": {"type": "string"}},
            },
        },
        "ReloadError": {
            "type": "object",
            "required": ["error", "errors"],
            "properties": {
                "error": ref("schemas", "Error"),
                "errors": {"type": "array", "items": {"type": "string"}},
            },
        },
    }
    responses = {name: _error_response(name) for name in _ERRORS}
    responses["Error"] = {
        "description": "Any other error, OpenAI-shaped like every error of the gateway "
        "(405 for a method the path does not take, for one).",
        "content": _json(ref("schemas", "ErrorResponse")),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fairway",
            "version": "0.1.0",
            "description": "A multi-tenant gateway for OpenAI-compatible LLM engines. Tenant "
            "keys call /v1, admin keys /admin, both as `Authorization: Bearer <key>`. Every error "
            'is OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.',
        },
        "tags": [
            {"name": "openai", "description": "The OpenAI API (tenant keys)"},
            {"name": "admin", "description": "Tenants, the fleet, config reload (admin keys)"},
            {"name": "gateway", "description": "Health, metrics, this document (no key)"},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "TenantKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant's API key",
                },
                "AdminKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin key (`[[admin.keys]]`)",
                },
            },
            "schemas": schemas,
            "responses": responses,
        },
    }


@functools.cache
def dumps() -> bytes:
    """The document as docs/openapi.json holds it."""
    return orjson.dumps(document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


async def serve(request: web.Request) -> web.Response:
    return web.Response(body=dumps(), content_type="application/json")


if __name__ == "__main__":
    sys.stdout.buffer.write(dumps())
