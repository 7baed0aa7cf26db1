"""Parse and measure: an OpenAI request body becomes a validated dict and a RequestInfo.

Only types and documented ranges are checked here, each error naming its parameter; anything
else is the engine's to judge, and its 4xx answer is relayed as it is.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import orjson

from engines.tokens import chat_prompt_tokens, completion_prompt_tokens
from gateway.config.schema import TenantConfig
from gateway.core.errors import bad_request
from gateway.core.request import Endpoint, RequestInfo
from gateway.http.auth import Principal
from gateway.lengths.service import REGIONS_HEADER

INTERACTION_HEADER = "X-Fairway-Interaction"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# Bounds on what the gateway keeps of a request, and on its shape.
MAX_DEPTH = 64  # nesting levels of arrays and objects, the body itself the first
MAX_ID_CHARS = 256  # an interaction id (header or metadata.interaction_id), `user`, cache_salt
MAX_MODEL_CHARS = 256
MAX_REGIONS_CHARS = 256  # the X-Fairway-Regions header
MAX_REGIONS = 8  # regions it names
# Content codings a body may arrive in; aiohttp decodes them in bounded steps, and the decoded
# body is held to server.max_body_bytes.
ENCODINGS = frozenset({"identity", "gzip", "deflate"})

# vLLM request fields that a tenant may not set, and why (README.md, "Pass-through policy").
REFUSED = {
    "priority": "the gateway's fairness queue orders requests, not the engine's priorities",
    "kv_transfer_params": "disaggregated-serving transfers are the operator's to set",
    "request_id": "the gateway gives every request its own engine id",
    "vllm_xargs": "custom engine extensions take no client arguments here",
    "logits_processors": "engine-side code is chosen by the operator, not by clients",
    "chat_template": "a client's template would run in the engine shared by every tenant",
    "prompt_embeds": "prompt embeddings cannot be measured or safely decoded by the gateway",
}
_SALT_DOMAIN = b"fairway-cache-salt\0"


_NUMBER = (int, float)


def _is(value: Any, kinds: type | tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


def _check_number(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is(value, _NUMBER):
        raise bad_request(f"{name} must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo:g} and {hi:g}, got {value!r}", name)


def _check_int(body: dict[str, Any], name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", name)
    if value < lo:
        raise bad_request(f"{name} must be >= {lo}, got {value!r}", name)
    return int(value)


def _check_str(value: Any, name: str, limit: int = MAX_ID_CHARS) -> None:
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string", name)
    if len(value) > limit:
        raise bad_request(f"{name} is longer than {limit} characters", name)


def _too_deep(raw: bytes, body: dict[str, Any]) -> str | None:
    """The top-level field nested deeper than MAX_DEPTH levels, if any; iterative, and only
    walked when the body has more brackets than MAX_DEPTH at all."""
    if raw.count(b"[") + raw.count(b"{") < MAX_DEPTH:
        return None
    stack = [(v, 2, k) for k, v in body.items() if isinstance(v, list | dict)]
    while stack:
        value, depth, key = stack.pop()
        if depth > MAX_DEPTH:
            return key
        items = value.values() if isinstance(value, dict) else value
        stack.extend((x, depth + 1, key) for x in items if isinstance(x, list | dict))
    return None


def check_encoding(value: str | None) -> str:
    """The body's content coding (lower case); raises a 400 for one the gateway takes not."""
    encoding = (value or "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise bad_request(
            f"Content-Encoding {encoding[:64]!r} is not supported; use one of "
            f"{', '.join(sorted(ENCODINGS))}",
            "Content-Encoding",
        )
    return encoding


def check_headers(interaction: str | None, regions: str | None) -> None:
    """Bounds on the gateway's own request headers; raises a 400 naming the header."""
    if interaction is not None and len(interaction) > MAX_ID_CHARS:
        raise bad_request(
            f"{INTERACTION_HEADER} is longer than {MAX_ID_CHARS} characters", INTERACTION_HEADER
        )
    if regions is not None:
        if len(regions) > MAX_REGIONS_CHARS:
            raise bad_request(
                f"{REGIONS_HEADER} is longer than {MAX_REGIONS_CHARS} characters", REGIONS_HEADER
            )
        if sum(1 for r in regions.split(",") if r.strip()) > MAX_REGIONS:
            raise bad_request(
                f"{REGIONS_HEADER} names more than {MAX_REGIONS} regions", REGIONS_HEADER
            )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array of message objects", "messages")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object, got {msg!r}", where)
        role = msg.get("role")
        if role not in ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}",
                f"{where}.role",
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise bad_request(
                f"{where}.content must be a string or an array of content parts", f"{where}.content"
            )
        if isinstance(content, list) and not all(isinstance(p, dict) for p in content):
            raise bad_request(f"{where}.content parts must be objects", f"{where}.content")


def _check_prompt(prompt: Any) -> None:
    def ok(p: Any) -> bool:
        if isinstance(p, str):
            return True
        if isinstance(p, list) and p:
            if all(_is(x, int) for x in p):
                return True
            return all(isinstance(x, str) or (isinstance(x, list) and ok(x)) for x in p)
        return False

    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if not ok(prompt):
        raise bad_request(
            "prompt must be a string, an array of strings, or an array of token ids", "prompt"
        )


def parse_body(raw: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """Decode and type-check an OpenAI request body; raises a 400 ApiError naming the field."""
    if not raw:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc) or "recursion" in str(exc).lower():
            raise bad_request(f"request body is nested deeper than {MAX_DEPTH} levels") from None
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    deep = _too_deep(raw, body)
    if deep is not None:
        raise bad_request(f"{deep} is nested deeper than {MAX_DEPTH} levels", deep)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a non-empty string", "model")
    _check_str(model, "model", MAX_MODEL_CHARS)
    for name, why in REFUSED.items():
        if body.get(name) is not None:
            raise bad_request(f"{name} may not be set: {why}", name)
    if endpoint is Endpoint.CHAT:
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body.get("prompt"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        if not stream:
            raise bad_request(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        if not isinstance(opts.get("include_usage", False), bool):
            raise bad_request(
                "stream_options.include_usage must be a boolean", "stream_options.include_usage"
            )
    for name in ("max_tokens", "max_completion_tokens", "n", "best_of"):
        _check_int(body, name, 1)
    _check_int(body, "top_logprobs", 0)
    _check_int(body, "prompt_logprobs", 0)
    logprobs = body.get("logprobs")
    if endpoint is Endpoint.CHAT:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise bad_request(f"logprobs must be a boolean, got {logprobs!r}", "logprobs")
    else:
        _check_int(body, "logprobs", 0)
    if body.get("user") is not None:
        _check_str(body["user"], "user")
    if body.get("cache_salt") is not None:
        _check_str(body["cache_salt"], "cache_salt")
        if not body["cache_salt"]:
            raise bad_request("cache_salt must be a non-empty string", "cache_salt")
    _check_number(body, "temperature", 0.0, 2.0)
    _check_number(body, "top_p", 0.0, 1.0)
    _check_number(body, "presence_penalty", -2.0, 2.0)
    _check_number(body, "frequency_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and not _is(seed, int):
        raise bad_request(f"seed must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad_request("stop must be a string or an array of strings", "stop")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata must be an object", "metadata")
    if isinstance(metadata, dict) and metadata.get("interaction_id") is not None:
        value = metadata["interaction_id"]
        if _is(value, int):
            value = str(value)
        _check_str(value, "metadata.interaction_id")
    return body


def completions_asked(body: dict[str, Any]) -> int:
    """Completions the engine generates for a validated body: max(n, best_of)."""
    return max(body.get("n") or 1, body.get("best_of") or 1)


@functools.lru_cache(maxsize=4096)  # a hash per request otherwise, mostly of the same pairs
def cache_salt(tenant: str, client: str | None = None) -> str:
    """The prefix-cache salt of a tenant's requests, stable across gateways: no request of
    another tenant can share its cached prefixes, whatever salt that one sends. A client's own
    salt (to keep its users apart too) is folded into its tenant's."""
    h = hashlib.sha256(_SALT_DOMAIN)
    for part in (tenant, client or ""):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def apply_tenant_policy(body: dict[str, Any], endpoint: Endpoint, tenant: TenantConfig) -> None:
    """The tenant's caps on a validated body (400 naming the parameter), and the gateway's
    prefix-cache salt set in it."""
    n, best_of = body.get("n") or 1, body.get("best_of") or 1
    if max(n, best_of) > tenant.max_n:
        name = "best_of" if best_of > n else "n"
        raise bad_request(
            f"{name} must be at most {tenant.max_n} for this tenant, got {max(n, best_of)}", name
        )
    names = ["top_logprobs", "prompt_logprobs"]
    if endpoint is Endpoint.COMPLETIONS:
        names.append("logprobs")
    for name in names:
        value = body.get(name)
        if value is not None and value > tenant.max_top_logprobs:
            raise bad_request(
                f"{name} must be at most {tenant.max_top_logprobs} for this tenant, got {value}",
                name,
            )
    client = body.get("cache_salt")
    if tenant.cache_salt:
        body["cache_salt"] = cache_salt(tenant.name, client)
    elif client is not None:
        raise bad_request(
            "cache_salt may not be set: this tenant's requests share the engines' unsalted "
            "prefix cache",
            "cache_salt",
        )


def measure(
    body: dict[str, Any],
    endpoint: Endpoint,
    principal: Principal,
    request_id: str,
    interaction_header: str | None,
    arrival: float | None = None,
    klass: str = "interactive",
    deadline: float | None = None,
) -> RequestInfo:
    """What is known of a validated request before any engine sees it; `klass` and
    `deadline` as `gateway.http.batch.request_class` found them."""
    if endpoint is Endpoint.CHAT:
        prompt = chat_prompt_tokens(body["messages"])
    else:
        prompt = completion_prompt_tokens(body["prompt"])
    metadata = body.get("metadata")
    interaction = interaction_header
    if interaction is None and isinstance(metadata, dict):
        value = metadata.get("interaction_id")
        interaction = str(value) if value is not None else None
    opts = body.get("stream_options")
    return RequestInfo(
        id=request_id,
        tenant=principal.tenant,
        app=principal.app,
        interaction_id=interaction,
        model=body["model"],
        endpoint=endpoint,
        prompt_tokens=prompt,
        max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
        stream=bool(body.get("stream")),
        include_usage=isinstance(opts, dict) and bool(opts.get("include_usage")),
        arrival=time.perf_counter() if arrival is None else arrival,
        n=completions_asked(body),
        klass=klass,
        deadline=deadline,
    )
