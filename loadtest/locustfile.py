"""Locust load test for Fairway: tenants and applications streaming chat through the gateway.

    .venv/bin/locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 40 -r 10 -t 3m AcmeChat AcmeAgent GlobexChat Abuser

One user class per (tenant, application) of the shipped config.toml, with its demo key:
`AcmeChat`, `AcmeAgent` (an agent: interactions of several sequential calls that share an
`X-Fairway-Interaction` id), `GlobexChat`, `InitechBatch`, and `Abuser` (initech's key sending
back to back, many times its share). Prompt and output lengths are drawn from the Azure LLM
conversation trace. `TraceShape` (select it with `FAIRWAY_SHAPE=trace`) replays the trace's
arrival rate, minute by minute, time-compressed by `FAIRWAY_SPEEDUP`.

Every request fires locust events: `STREAM` (latency to the last byte, length = output tokens)
and `TTFT` (time to the first content token). With `FAIRWAY_RECORDS=path.jsonl` each request is
also written as one JSON line (tenant, times, tokens, status) for `loadtest/report.py`, which
computes VTC's fairness metrics. This package talks HTTP only; it imports nothing of Fairway.

Environment: FAIRWAY_MODEL (llama-3.1-8b), FAIRWAY_TRACE (the Azure CSV), FAIRWAY_MAX_OUTPUT
(cap on output tokens, 256), FAIRWAY_CYCLE_S (seconds between a user's requests, 4),
FAIRWAY_SPEEDUP (trace compression, 60), FAIRWAY_MAX_PROMPT (cap on prompt tokens, so that
every request fits the engines' context; 0, the default, for none), FAIRWAY_KEY_<CLASS> to
override a class's key,
FAIRWAY_USERS (e.g. AcmeChat=6,Abuser=10: exact user counts per class).
"""

from __future__ import annotations

import csv
import json
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from locust import HttpUser, LoadTestShape, between, constant, constant_pacing, task

MODEL = os.environ.get("FAIRWAY_MODEL", "llama-3.1-8b")
TRACE = Path(
    os.environ.get(
        "FAIRWAY_TRACE",
        Path(__file__).resolve().parents[2] / "shared/data/azure-llm-2023/conv.csv",
    )
)
MAX_OUTPUT = int(os.environ.get("FAIRWAY_MAX_OUTPUT", "256"))
MAX_PROMPT = int(os.environ.get("FAIRWAY_MAX_PROMPT", "0"))
CYCLE_S = float(os.environ.get("FAIRWAY_CYCLE_S", "4"))
SPEEDUP = float(os.environ.get("FAIRWAY_SPEEDUP", "60"))
RECORDS = os.environ.get("FAIRWAY_RECORDS")


def _trace() -> list[tuple[float, int, int]]:
    """(seconds since the first request, prompt tokens, output tokens); a small built-in
    sample when the trace file is not there."""
    if not TRACE.exists():
        return [(i * 0.2, 300 + 97 * i % 1500, 20 + 37 * i % 300) for i in range(300)]
    rows = []
    with open(TRACE, newline="") as f:
        for r in csv.DictReader(f):
            hms = r["TIMESTAMP"][11:].split(":")
            t = int(hms[0]) * 3600 + int(hms[1]) * 60 + float(hms[2])
            rows.append((t, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    rows.sort()
    return [(t - rows[0][0], p, o) for t, p, o in rows]


ROWS = _trace()
_lock = threading.Lock()
_out = open(RECORDS, "a", buffering=1) if RECORDS else None  # noqa: SIM115 (process lifetime)


def record(**fields: Any) -> None:
    if _out is not None:
        with _lock:
            _out.write(json.dumps(fields) + "\n")


class FairwayUser(HttpUser):
    """A tenant's application: streaming chat completions with lengths from the trace."""

    abstract = True
    key = ""
    tenant = ""
    app = "chat"
    weight = 1
    wait_time = constant_pacing(CYCLE_S)
    prompt_scale = 1.0  # multiplies the trace's prompt lengths

    def on_start(self) -> None:
        self.key = os.environ.get(f"FAIRWAY_KEY_{type(self).__name__.upper()}", self.key)
        self.rng = random.Random()

    def chat(self, interaction: str | None = None) -> int:
        """One streaming request; returns its HTTP status."""
        _, prompt, output = self.rng.choice(ROWS)
        prompt = max(1, int(prompt * self.prompt_scale))
        if MAX_PROMPT > 0:
            prompt = min(prompt, MAX_PROMPT)
        body = {
            "model": MODEL,
            # About four characters a token, as the gateway estimates.
            "messages": [{"role": "user", "content": "tok " * prompt}],
            "max_tokens": max(1, min(output, MAX_OUTPUT)),
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        headers = {"Authorization": f"Bearer {self.key}"}
        if interaction is not None:
            headers["X-Fairway-Interaction"] = interaction
        name = f"{self.tenant}/{self.app}"
        start = time.time()
        first: float | None = None
        tokens = prompt_tokens = 0
        status = 0
        retry: str | None = None
        with self.client.post(
            "/v1/chat/completions", json=body, headers=headers, stream=True,
            catch_response=True, name=name,
        ) as resp:  # fmt: skip
            status = resp.status_code
            if status == 200:
                for line in resp.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and first is None:
                        first = time.time()
                    usage = event.get("usage")
                    if usage:
                        tokens = usage.get("completion_tokens", tokens)
                        prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                resp.success()
            else:
                resp.failure(f"{status}: {resp.text[:200]}")
                retry = resp.headers.get("Retry-After")
        end = time.time()
        events = self.environment.events.request
        if first is not None:
            events.fire(request_type="TTFT", name=name, response_time=(first - start) * 1000,
                        response_length=0, exception=None, context={})  # fmt: skip
            events.fire(request_type="STREAM", name=name, response_time=(end - start) * 1000,
                        response_length=tokens, exception=None, context={})  # fmt: skip
        if status == 429 and retry:  # back off as the openai SDK does
            time.sleep(min(float(retry), 30.0))
        record(tenant=self.tenant, app=self.app, interaction=interaction, arrival=start,
               first_token=first, finish=end,
               prompt_tokens=prompt_tokens or prompt, output_tokens=tokens,
               status="ok" if status == 200 else str(status))  # fmt: skip
        return status

    @task
    def request(self) -> None:
        self.chat()


class AcmeChat(FairwayUser):
    key = "sk-acme-chat"
    tenant = "acme"
    weight = 2


class AcmeAgent(FairwayUser):
    """An agent: each task is one interaction of 3 to 6 calls, each sent when the previous one
    has finished, all under one interaction id."""

    key = "sk-acme-agent"
    tenant = "acme"
    app = "agent"
    wait_time = between(CYCLE_S, 2 * CYCLE_S)

    @task
    def request(self) -> None:
        interaction = f"agent-{uuid.uuid4().hex[:12]}"
        for _ in range(self.rng.randint(3, 6)):
            if self.chat(interaction) != 200:
                break  # the interaction was refused at its first call
            time.sleep(self.rng.uniform(0.1, 0.5))  # the tool runs


class GlobexChat(FairwayUser):
    key = "sk-globex-chat"
    tenant = "globex"


class InitechBatch(FairwayUser):
    key = "sk-initech-batch"
    tenant = "initech"
    app = "batch"
    prompt_scale = 2.0


class Abuser(FairwayUser):
    """initech's batch key sent back to back: many times its share."""

    key = "sk-initech-batch"
    tenant = "initech"
    app = "batch"
    wait_time = constant(0)
    weight = 1


def _pin_user_counts() -> None:
    """FAIRWAY_USERS=AcmeChat=6,Abuser=10 runs exactly that many users of those classes,
    whatever -u says (locust's fixed_count)."""
    for item in filter(None, os.environ.get("FAIRWAY_USERS", "").split(",")):
        name, _, count = item.partition("=")
        cls = globals().get(name.strip())
        if isinstance(cls, type) and issubclass(cls, FairwayUser):
            cls.fixed_count = int(count)


_pin_user_counts()


class TraceShape(LoadTestShape):
    """Users over time such that the arrival rate follows the Azure trace, minute by minute,
    `FAIRWAY_SPEEDUP` times faster: with each user sending every `FAIRWAY_CYCLE_S` seconds,
    users = rate x cycle."""

    use_common_options = True
    abstract = os.environ.get("FAIRWAY_SHAPE", "") != "trace"

    def __init__(self) -> None:
        super().__init__()
        per_minute: dict[int, int] = {}
        for t, _, _ in ROWS:
            per_minute[int(t // 60)] = per_minute.get(int(t // 60), 0) + 1
        self.minutes = [per_minute.get(m, 0) for m in range(max(per_minute) + 1)]
        self.scale = float(os.environ.get("FAIRWAY_RATE_SCALE", "0.05"))

    def tick(self) -> tuple[int, float] | None:
        m = int(self.get_run_time() * SPEEDUP // 60)
        if m >= len(self.minutes):
            return None
        rate = self.minutes[m] / 60 * SPEEDUP * self.scale  # requests per second
        return max(1, round(rate * CYCLE_S)), 10.0
