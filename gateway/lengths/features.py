"""What is known of a request when it arrives, as features for the output-length predictor.

`extract` reads a validated OpenAI body and its `RequestInfo` into one flat record of plain
JSON values: the same record is the predictor's input and, with the real output length added
when the request finishes, a line of the feature log that `fairway train-router` learns from.
Everything here is cheap (one pass over the last user message, no tokenizer) because it runs
on the event loop for every request.
"""

from __future__ import annotations

import re
from typing import Any

from engines.tokens import content_tokens
from gateway.core.request import RequestInfo

Record = dict[str, Any]

# Categorical features: strings in the record, vocabulary indices in the model.
CATEGORICAL: tuple[str, ...] = ("model", "tenant", "app")
# Numeric features, in the model's column order after the categorical ones. A missing value
# (no max_tokens, no temperature) is NaN to the model, which LightGBM routes on its own.
NUMERIC: tuple[str, ...] = (
    "chat",
    "prompt_tokens",
    "max_tokens",
    "n_messages",
    "n_system",
    "n_user",
    "n_assistant",
    "n_tool",
    "system_tokens",
    "last_user_tokens",
    "last_user_questions",
    "last_user_lines",
    "last_user_number",
    "last_user_code",
    "asks_brief",
    "asks_detail",
    "temperature",
    "top_p",
    "n_tools",
    "response_format",
    "has_stop",
    "stream",
    "app_recent_mean",
    "app_recent_n",
)
TARGET = "output_tokens"

_BRIEF = re.compile(r"\b(brief|briefly|short|concise|one word|one sentence|yes or no|tl;?dr)\b")
_DETAIL = re.compile(r"\b(detail|detailed|step by step|essay|thorough|comprehensive|explain)\b")
_NUMBER = re.compile(r"\b\d{1,6}\b")
# Substrings that every match of the pattern contains: most texts hold none, and `in` is far
# cheaper than a regex scan that tries every word.
_BRIEF_HINTS = ("brief", "short", "concise", "one ", "yes or no", "dr")
_DETAIL_HINTS = ("detail", "step by step", "essay", "thorough", "comprehensive", "explain")
_DIGIT = re.compile(r"\d")
_FORMATS = {"text": 0, "json_object": 1, "json_schema": 2}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _matches(pattern: re.Pattern[str], hints: tuple[str, ...], text: str) -> int:
    for hint in hints:
        if hint in text:
            return int(pattern.search(text) is not None)
    return 0


def _last_user(text: str) -> Record:
    low = text[-4000:].lower()  # the ask is usually at the end; bound the scan
    numbers = [int(m) for m in _NUMBER.findall(low)] if _DIGIT.search(low) else []
    return {
        "last_user_questions": low.count("?"),
        "last_user_lines": low.count("\n") + 1 if low else 0,
        "last_user_number": max(numbers) if numbers else None,
        "last_user_code": int("```" in low),
        "asks_brief": _matches(_BRIEF, _BRIEF_HINTS, low),
        "asks_detail": _matches(_DETAIL, _DETAIL_HINTS, low),
    }


def extract(info: RequestInfo, body: dict[str, Any]) -> Record:
    """The predictor's features of one request (without the application's history)."""
    rec: Record = {
        "model": info.model,
        "tenant": info.tenant,
        "app": info.app,
        "chat": int(info.endpoint == "chat"),
        "prompt_tokens": info.prompt_tokens,
        "max_tokens": info.max_tokens,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "has_stop": int(body.get("stop") is not None),
        "stream": int(info.stream),
    }
    tools = body.get("tools")
    rec["n_tools"] = len(tools) if isinstance(tools, list) else 0
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    rec["response_format"] = _FORMATS.get(kind, 0) if isinstance(kind, str) else 0
    messages = body.get("messages")
    counts = {"system": 0, "developer": 0, "user": 0, "assistant": 0, "tool": 0, "function": 0}
    system_tokens = 0
    last_user = ""
    if isinstance(messages, list):
        for msg in messages:
            role = msg.get("role")
            counts[role] = counts.get(role, 0) + 1
            if role in ("system", "developer"):
                system_tokens += content_tokens(msg.get("content"))
            elif role == "user":
                last_user = _text(msg.get("content"))
        rec["n_messages"] = len(messages)
    else:
        prompt = body.get("prompt")
        last_user = prompt if isinstance(prompt, str) else ""
        rec["n_messages"] = 0
    rec["n_system"] = counts["system"] + counts["developer"]
    rec["n_user"] = counts["user"]
    rec["n_assistant"] = counts["assistant"]
    rec["n_tool"] = counts["tool"] + counts["function"]
    rec["system_tokens"] = system_tokens
    rec["last_user_tokens"] = -(-len(last_user.encode()) // 4)
    rec.update(_last_user(last_user))
    return rec
