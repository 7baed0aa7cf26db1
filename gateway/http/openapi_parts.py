"""Building blocks of the gateway's OpenAPI description (`gateway.http.openapi`): the
OpenAI error shapes, request and response schemas, the headers the gateway reads."""

from __future__ import annotations

from typing import Any

from engines.perf_model import GPUS, MODELS
from gateway.http.batch import CLASS_HEADER, CLASSES, DEADLINE_HEADER
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
    "RequestTimeout": (
        408,
        "The request body did not arrive within `server.body_timeout_s`; or, code "
        "`batch_deadline_exceeded`, a batch request's deadline passed while it waited for a "
        "region with room.",
    ),
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
        "state": {
            "type": "string",
            "enum": ["active", "half_open", "draining", "ejected", "removed"],
        },
        "in_flight": {"type": "integer"},
        "in_flight_elsewhere": {
            "type": "integer",
            "description": "Other replicas' requests there (shared state; 0 with one replica).",
        },
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
        # Read by `fairway engine vllm` only: the gateway never starts vllm engines itself.
        "model_path": {"type": "string", "description": "vllm: the weights to load."},
        "vllm_python": {"type": "string", "description": "vllm: the Python that has vLLM."},
        "vllm_args": {"type": "array", "items": {"type": "string"}},
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
    {
        "name": CLASS_HEADER,
        "in": "header",
        "required": False,
        "description": "`batch`: delay-tolerant; the request waits until a region has room "
        "(below `batch.feed_below` of its engines' limits), at the latest until its deadline. "
        "Default: the application's `demand_class`; a batch application may claim "
        "`interactive` only with `allow_interactive`.",
        "schema": {"type": "string", "enum": list(CLASSES)},
    },
    {
        "name": DEADLINE_HEADER,
        "in": "header",
        "required": False,
        "description": "Batch requests only: seconds from now by which the answer is wanted, "
        "more than 0 and at most the application's `batch_max_deadline_s` (default "
        "`batch_deadline_s`, 24 h). The request starts early enough for its expected service "
        "time; one that could not start before its deadline gets 408 "
        "`batch_deadline_exceeded`.",
        "schema": {"type": "string", "pattern": r"^[0-9]{1,12}(\.[0-9]{1,9})?$"},
    },
]

MINUTES = {
    "name": "minutes",
    "in": "query",
    "required": False,
    "description": "How many minutes back, the one under way included (default 60).",
    "schema": {"type": "integer", "minimum": 1, "maximum": 7 * 24 * 60},
}
_COUNTS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
DEMAND: Schema = {
    "type": "object",
    "required": ["minute_start", "minutes", "scope", "series"],
    "properties": {
        "minute_start": {"type": "integer", "description": "Minutes since the Unix epoch."},
        "minutes": {"type": "integer"},
        "scope": {
            "type": "string",
            "enum": ["replica", "replicas"],
            "description": "`replicas`: summed over every replica (Redis state); `replica`: "
            "this one's alone (memory state, or Redis not answering).",
        },
        "series": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model", "region", "class", "requests", "prompt_tokens",
                             "output_tokens"],
                "properties": {
                    "model": {"type": "string"},
                    "region": {"type": "string"},
                    "class": {"type": "string", "enum": ["interactive", "batch"]},
                    "requests": _COUNTS,
                    "prompt_tokens": _COUNTS,
                    "output_tokens": _COUNTS,
                },
            },
        },
    },
}  # fmt: skip
