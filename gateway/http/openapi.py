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

from engines.perf_model import GPUS, MODELS
from gateway.http.request import INTERACTION_HEADER, ROLES
from gateway.lengths.service import REGIONS_HEADER

Schema = dict[str, Any]


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _int(minimum: int, description: str) -> Schema:
    return _nullable({"type": "integer", "minimum": minimum, "description": description})


def _number(lo: float, hi: float, description: str) -> Schema:
    return _nullable({"type": "number", "minimum": lo, "maximum": hi, "description": description})


_ERRORS = {
    "BadRequest": (
        400,
        "Malformed JSON or a parameter of the wrong type or out of range; "
        "`param` names it. An engine's own 4xx is relayed as it is.",
    ),
    "Unauthorized": (401, "A missing, malformed or unknown key."),
    "NotFound": (404, "An unknown model, engine or endpoint."),
    "MethodNotAllowed": (405, "The path exists, the method does not; `Allow` lists those that do."),
    "RequestTimeout": (408, "The request body did not arrive within `server.body_timeout_s`."),
    "PayloadTooLarge": (413, "The body is larger than `server.max_body_bytes`."),
    "Conflict": (409, "An engine with this id is already in the fleet."),
    "TooManyRequests": (
        429,
        "The tenant's token bucket is empty while the model is overloaded, "
        "or its queue for the model is full; `Retry-After` says when to retry.",
    ),
    "BadGateway": (502, "The engine failed or sent an invalid answer."),
    "ServiceUnavailable": (
        503,
        "No healthy engine serves the model, the queue wait timed out, "
        "or the gateway is shutting down; `Retry-After` says when to retry.",
    ),
    "GatewayTimeout": (504, "The engine did not answer within `server.read_timeout_s`."),
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}


def _error_response(name: str) -> Schema:
    _, description = _ERRORS[name]
    out: Schema = {"description": description, "content": _json(_ref("schemas", "ErrorResponse"))}
    if name in ("TooManyRequests", "ServiceUnavailable"):
        out["headers"] = _RETRY_AFTER
    if name == "MethodNotAllowed":
        out["headers"] = {"Allow": {"description": "Allowed methods", "schema": {"type": "string"}}}
    return out


def _errors(*names: str) -> dict[str, Schema]:
    out = {str(_ERRORS[n][0]): _ref("responses", n) for n in names}
    out["default"] = _ref("responses", "Error")
    return out


_MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": sorted(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": _ref("schemas", "ContentPart")},
                {"type": "null"},
            ]
        },
    },
}

_CONTENT_PART: Schema = {
    "type": "object",
    "description": 'A typed part, such as `{"type": "text", "text": "..."}`; the engine judges '
    "its fields.",
}

_STREAM_OPTIONS: Schema = _nullable(
    {
        "type": "object",
        "description": "Only with `stream: true`.",
        "properties": {"include_usage": {"type": "boolean"}},
    }
)


def _sampling() -> dict[str, Schema]:
    """The parameters both endpoints share, as `parse_body` checks them."""
    return {
        "stream": _nullable({"type": "boolean"}),
        "stream_options": _STREAM_OPTIONS,
        "max_tokens": _int(1, "Upper bound on the tokens of the answer."),
        "max_completion_tokens": _int(1, "Takes precedence over max_tokens."),
        "n": _int(1, "Choices to generate."),
        "top_logprobs": _int(0, "Most likely tokens to return at each position."),
        "temperature": _number(0, 2, "Sampling temperature."),
        "top_p": _number(0, 1, "Nucleus sampling mass."),
        "presence_penalty": _number(-2, 2, "Penalty for tokens already present."),
        "frequency_penalty": _number(-2, 2, "Penalty proportional to token frequency."),
        "seed": _nullable({"type": "integer"}),
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ]
        },
        "metadata": _nullable(
            {
                "type": "object",
                "description": "`interaction_id` groups the calls of one user action, as "
                f"`{INTERACTION_HEADER}` does.",
            }
        ),
    }


def _request(required: list[str], own: dict[str, Schema], description: str) -> Schema:
    return {
        "type": "object",
        "description": description + " Other OpenAI parameters are passed to the engine.",
        "required": required,
        "properties": {"model": {"type": "string", "minLength": 1}, **own, **_sampling()},
        # stream_options without stream: true is refused.
        "dependentSchemas": {
            "stream_options": {
                "properties": {"stream": {"const": True}},
                "required": ["stream"],
            }
        },
    }


_TOKEN_IDS: Schema = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
_PROMPT: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ]
}

_USAGE: Schema = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
    },
}


def _completion(obj: str, choice: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "const": obj},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("schemas", "Usage"),
        },
    }


_CHOICE: Schema = {
    "type": "object",
    "properties": {"index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]}},
}

_ENGINE: Schema = {
    "type": "object",
    "required": ["id", "region", "model", "url", "kind", "state"],
    "properties": {
        "id": {"type": "string"},
        "region": {"type": "string"},
        "model": {"type": "string"},
        "url": {"type": "string"},
        "kind": {"type": "string", "enum": ["sim", "vllm"]},
        "state": {"type": "string", "enum": ["active", "draining", "ejected", "removed"]},
        "in_flight": {"type": "integer"},
        "max_running": {"type": ["integer", "null"]},
        "max_kv_tokens": {"type": ["integer", "null"]},
        "running": {"type": "integer"},
        "waiting": {"type": "integer"},
        "kv_usage": {"type": "number"},
    },
}

_NEW_ENGINE: Schema = {
    "type": "object",
    "description": 'One `[[engines.REGION."MODEL"]]` entry of config.toml plus its region and '
    'model; `kind = "sim"` starts a simulated engine in-process.',
    "required": ["region", "model"],
    "additionalProperties": False,
    "properties": {
        "region": {"type": "string", "minLength": 1},
        "model": {"type": "string", "minLength": 1},
        "kind": {"type": "string", "enum": ["sim", "vllm"], "default": "sim"},
        "id": {"type": "string", "description": "Default: REGION/MODEL/INDEX."},
        "url": {"type": "string", "description": "Required for vllm: an http(s) URL."},
        "api_key": {"type": "string"},
        "api_key_env": {"type": "string"},
        "gpu": {"type": "string", "enum": sorted(GPUS), "default": "H100"},
        "arch": {"type": "string", "enum": sorted(MODELS)},
        "tp": {"type": "integer", "minimum": 1},
        "port": {"type": "integer", "minimum": 0, "maximum": 65535},
        "max_num_seqs": {"type": "integer", "minimum": 1},
        "max_batched_tokens": {"type": "integer", "minimum": 16},
        "max_running": {"type": "integer", "minimum": 1},
        "max_kv_tokens": {"type": "integer", "minimum": -1},
    },
}

_HEADERS = [
    {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Echoed back when it is 1 to 128 of `A-Za-z0-9._:-`; the gateway's own id "
        "otherwise.",
        "schema": {"type": "string"},
    },
    {
        "name": INTERACTION_HEADER,
        "in": "header",
        "required": False,
        "description": "The same id on every call of one user action: admission never refuses "
        "a call that continues an interaction in progress.",
        "schema": {"type": "string"},
    },
    {
        "name": REGIONS_HEADER,
        "in": "header",
        "required": False,
        "description": "Comma-separated regions to prefer, overriding the configured ones.",
        "schema": {"type": "string"},
    },
]


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
