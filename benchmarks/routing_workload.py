"""A multi-tenant workload from the Azure LLM conversation trace, for routing evaluation.

The trace has arrival times and token counts only: no tenants, applications or text. Every row
is given, deterministically from its index, to one of five applications whose length profiles
differ (a chat assistant, a decode-heavy coding agent, a prefill-heavy summariser, a classifier
with tiny outputs, a long-form writer). The application rescales the row's prompt and output
tokens and fills an OpenAI chat body with what such a client would send: its system prompt,
earlier turns, `max_tokens`, sampling parameters, tools or a response format, and a last user
message whose wording carries some signal of the answer's length ("briefly", "about 600
words"), as real asks do. All of that is synthetic; arrivals and the base token counts are the
trace's. `docs/ROUTING.md` says so next to the figures.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._common import TRACE, read_trace

MAX_CONTEXT = 8192  # the simulated engines' max_model_len


@dataclass(frozen=True, slots=True)
class Row:
    t: float  # seconds since the trace's first request
    prompt: int
    output: int


def load_trace(path: Path = TRACE) -> list[Row]:
    """The trace's rows in file order, timed from its first row; outputs of at least 1 token."""
    rows: list[Row] = []
    t0: dt.datetime | None = None
    for ts, prompt, output in read_trace(path):
        t0 = t0 or ts
        rows.append(Row((ts - t0).total_seconds(), prompt, max(1, output)))
    return rows


@dataclass(frozen=True, slots=True)
class App:
    tenant: str
    name: str
    share: float
    prompt_scale: float
    output_scale: float
    max_tokens: int
    system_tokens: int
    temperature: float
    tools: int = 0
    json_format: bool = False


APPS: tuple[App, ...] = (
    App("acme", "chat", 0.35, 1.0, 1.0, 1024, 180, 0.7),
    App("acme", "agent", 0.15, 0.8, 2.5, 2048, 600, 0.2, tools=4),
    App("globex", "summarise", 0.20, 2.5, 0.25, 256, 60, 0.3),
    App("initech", "classify", 0.15, 0.4, 0.05, 16, 120, 0.0, json_format=True),
    App("globex", "writer", 0.15, 0.15, 3.0, 4096, 40, 1.0),
)
_TEXT = (
    "the of and to in is for on that with as by this be are from at or an it was which can data "
    "system model report customer order service value result issue team plan project"
)
_WORDS = _TEXT.split()
_FILLER = " ".join(random.Random(7).choice(_WORDS) for _ in range(4000))


def _filler(tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of text (four bytes a token, as engines.tokens counts)."""
    n = max(0, 4 * tokens - 1)
    out = []
    while n > 0:
        start = rng.randrange(0, len(_FILLER) // 2)
        piece = _FILLER[start : start + min(n, len(_FILLER) // 2)]
        out.append(piece)
        n -= len(piece)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Request:
    """One synthetic request: who sends it, what it sends, and what the engine will answer."""

    t: float
    tenant: str
    app: str
    prompt_tokens: int  # target; the body's estimate is what the gateway measures
    output_tokens: int
    body: dict[str, Any]


def _pick(index: int) -> App:
    u = random.Random(index * 7919 + 1).random()
    acc = 0.0
    for app in APPS:
        acc += app.share
        if u < acc:
            return app
    return APPS[-1]


def synthesize(i: int, row: Row, model: str = "llama-3.1-8b") -> Request:
    app = _pick(i)
    rng = random.Random(i)
    out = max(1, round(row.output * app.output_scale * rng.uniform(0.8, 1.25)))
    prompt = max(16, round(row.prompt * app.prompt_scale))
    max_tokens = app.max_tokens
    if app.name == "chat" and rng.random() < 0.3:
        max_tokens = rng.choice((128, 256, 512))  # clients that cap answers on their own
    prompt = min(prompt, MAX_CONTEXT - max_tokens - 64)
    out = min(out, max_tokens)
    # The last user message carries the ask; its wording tells something of the length.
    ask = "Reply to the customer."
    if app.name == "writer":
        ask = f"Write about {round(out * 0.75 * rng.uniform(0.7, 1.4))} words on this."
    elif app.name == "classify":
        ask = "Classify this ticket. Answer in one word."
    elif app.name == "summarise":
        ask = "Summarise the document above." + (" Be brief." if out < 40 else "")
    elif app.name == "agent":
        ask = "```\nfix the failing step\n```" + (" Explain step by step." if out > 800 else "")
    elif out < 60 and rng.random() < 0.6:
        ask = "Can you answer briefly?"
    elif out > 400 and rng.random() < 0.6:
        ask = "Can you explain in detail?"
    turns = 0 if app.name in ("classify", "summarise") else min(8, prompt // 400)
    turn_tokens = 0 if not turns else (prompt - app.system_tokens) // (2 * turns + 2)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _filler(app.system_tokens, rng)}
    ]
    for _ in range(turns):
        messages.append({"role": "user", "content": _filler(turn_tokens, rng)})
        messages.append({"role": "assistant", "content": _filler(turn_tokens, rng)})
    used = 3 + sum(3 + -(-len(m["content"]) // 4) for m in messages) + 3
    last = max(4, prompt - used - len(ask) // 4)
    messages.append({"role": "user", "content": _filler(last, rng) + "\n" + ask})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": app.temperature,
    }
    if app.tools:
        body["tools"] = [
            {"type": "function", "function": {"name": f"tool{k}", "parameters": {}}}
            for k in range(app.tools)
        ]
    if app.json_format:
        body["response_format"] = {"type": "json_object"}
    return Request(row.t, app.tenant, app.name, prompt, out, body)


def requests(rows: list[Row], start: int = 0, model: str = "llama-3.1-8b") -> Iterator[Request]:
    """Synthetic requests for `rows`, which are rows `start`.. of the trace."""
    for k, row in enumerate(rows):
        yield synthesize(start + k, row, model)
