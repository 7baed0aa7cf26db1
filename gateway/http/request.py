"""Parse and measure: an OpenAI request body becomes a validated dict and a RequestInfo.

Only types and documented ranges are checked here, each error naming its parameter; anything
else is the engine's to judge, and its 4xx answer is relayed as it is.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from engines.tokens import chat_prompt_tokens, completion_prompt_tokens
from gateway.core.errors import bad_request
from gateway.core.request import Endpoint, RequestInfo
from gateway.http.auth import Principal

INTERACTION_HEADER = "X-Fairway-Interaction"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


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
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a non-empty string", "model")
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
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _check_int(body, name, 1)
    _check_int(body, "top_logprobs", 0)
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
    return body


def measure(
    body: dict[str, Any],
    endpoint: Endpoint,
    principal: Principal,
    request_id: str,
    interaction_header: str | None,
    arrival: float | None = None,
) -> RequestInfo:
    """What is known of a validated request before any engine sees it."""
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
    )
