"""The simulated engine as an OpenAI-compatible HTTP server with vLLM's metric names.

It behaves like a vLLM engine in time, not in text: tokens are filler words streamed at the
instants the performance model gives, and usage counts are the simulated token counts.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engines.protocol import SSE_DONE, error_response, json_response, sse_event, sse_headers
from engines.sim.engine import SimEngine, SimEngineConfig, Stream
from engines.tokens import chat_prompt_tokens, completion_prompt_tokens

WORDS = ("the", "model", "is", "simulated", "so", "these", "words", "only", "keep", "time")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def filler(start: int, stop: int) -> str:
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(start, stop))


class _SchedulerGauges(Collector):
    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.labels = {"model_name": engine.cfg.model, "engine": engine.cfg.engine_id}

    def collect(self) -> Iterator[Metric]:
        s = self.engine.sched
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch.", len(s.running)),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", len(s.waiting)),
            ("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", s.kv_usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=list(self.labels))
            g.add_metric(list(self.labels.values()), value)
            yield g

    def describe(self) -> Iterator[Metric]:
        return iter(())


class SimMetrics:
    def __init__(self, engine: SimEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerGauges(engine))
        labels = {"model_name": engine.cfg.model, "engine": engine.cfg.engine_id}
        names = list(labels)
        values = list(labels.values())
        reg = self.registry
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", names, registry=reg
        ).labels(*values)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", names, registry=reg
        ).labels(*values)
        self._success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*names, "finished_reason"],
            registry=reg,
        )
        self.success = {r: self._success.labels(*values, r) for r in ("stop", "length", "abort")}
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            names,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ).labels(*values)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            names,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ).labels(*values)


ENGINE_KEY = web.AppKey("sim_engine", SimEngine)
METRICS_KEY = web.AppKey("sim_metrics", SimMetrics)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _int_param(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _BadRequest(f"{name} must be a positive integer, got {value!r}", name)
    return value


def _parse(engine: SimEngine, body: Any, chat: bool) -> tuple[int, int, int, dict[str, Any]]:
    """Returns (prompt tokens, max tokens, target output tokens, body)."""
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    if body.get("model") != engine.cfg.model:
        raise _BadRequest(f"The model `{body.get('model')}` does not exist.", "model", 404)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty list", "messages")
        prompt = chat_prompt_tokens(messages)
    else:
        if "prompt" not in body:
            raise _BadRequest("prompt is required", "prompt")
        prompt = max(1, completion_prompt_tokens(body["prompt"]))
    if _int_param(body, "n", 1) != 1:
        raise _BadRequest("the simulated engine supports n = 1 only", "n")
    room = engine.max_model_len - prompt
    default = room if chat else 16  # OpenAI's completions default
    max_tokens = _int_param(body, "max_completion_tokens", None) or _int_param(
        body, "max_tokens", default
    )
    assert max_tokens is not None
    if max_tokens > room:
        raise _BadRequest(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, "
            f"you requested {prompt + max_tokens} tokens ({prompt} in the messages, "
            f"{max_tokens} in the completion).",
            "max_tokens",
        )
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest("seed must be an integer", "seed")
    target = max_tokens if body.get("ignore_eos") else engine.sample_output_len(seed)
    # Trace replay: the length the trace recorded, without revealing it through max_tokens.
    forced = _int_param(body, "sim_output_tokens", None)
    if forced is not None:
        target = forced
    return prompt, max_tokens, min(target, max_tokens), body


def _choice(chat: bool, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _usage(prompt: int, output: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    metrics = request.app[METRICS_KEY]
    key = engine.cfg.api_key
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    if key is not None and not hmac.compare_digest(given, f"Bearer {key}".encode()):
        return error_response(401, "invalid API key", code="invalid_api_key")
    try:
        body = orjson.loads(await request.read())
        prompt, max_tokens, target, body = _parse(engine, body, chat)
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"invalid JSON body: {exc}")
    except _BadRequest as exc:
        return error_response(exc.status, str(exc), param=exc.param)

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    base = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": engine.cfg.model,
    }
    start = time.perf_counter()
    stream = engine.submit(rid, prompt, target)
    metrics.prompt_tokens.inc(prompt)
    try:
        if body.get("stream"):
            opts = body.get("stream_options")
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            resp = await _stream(request, stream, base, chat, max_tokens, usage, start, metrics)
        else:
            resp = await _whole(stream, base, chat, max_tokens, start, metrics)
    except _ClientGone as gone:
        # The client went away mid-stream: free the slot and its KV blocks, as vLLM aborts a
        # request. Not a server error: nothing to log, the response simply ends here.
        engine.abort(stream)
        metrics.success["abort"].inc()
        return gone.resp
    except (asyncio.CancelledError, ConnectionError):
        engine.abort(stream)
        metrics.success["abort"].inc()
        raise
    seq = stream.seq
    metrics.success["length" if seq.output >= max_tokens else "stop"].inc()
    metrics.e2e.observe(time.perf_counter() - start)
    return resp


class _ClientGone(Exception):
    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp


async def _next_tokens(stream: Stream) -> None:
    await stream.wake.wait()
    stream.wake.clear()


async def _stream(
    request: web.Request,
    stream: Stream,
    base: dict[str, Any],
    chat: bool,
    max_tokens: int,
    include_usage: bool,
    start: float,
    metrics: SimMetrics,
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=sse_headers())
    await resp.prepare(request)
    seq = stream.seq
    sent = 0
    try:
        while not seq.finished:
            await _next_tokens(stream)
            if seq.output == sent:
                continue
            if sent == 0:
                metrics.ttft.observe(time.perf_counter() - start)
            finish = None
            if seq.finished:
                finish = "length" if seq.output >= max_tokens else "stop"
            choice = _choice(chat, filler(sent, seq.output), finish, sent == 0)
            metrics.generation_tokens.inc(seq.output - sent)
            sent = seq.output
            await resp.write(sse_event({**base, "choices": [choice]}))
        if include_usage:
            usage = _usage(seq.prompt_tokens, seq.output)
            await resp.write(sse_event({**base, "choices": [], "usage": usage}))
        await resp.write(SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        raise _ClientGone(resp) from None
    return resp


async def _whole(
    stream: Stream,
    base: dict[str, Any],
    chat: bool,
    max_tokens: int,
    start: float,
    metrics: SimMetrics,
) -> web.Response:
    seq = stream.seq
    first = True
    while not seq.finished:
        await _next_tokens(stream)
        if first and seq.output:
            metrics.ttft.observe(time.perf_counter() - start)
            first = False
    metrics.generation_tokens.inc(seq.output)
    text = filler(0, seq.output)
    finish = "length" if seq.output >= max_tokens else "stop"
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return json_response(
        {**base, "object": obj, "choices": [choice], "usage": _usage(seq.prompt_tokens, seq.output)}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    card = {
        "id": engine.cfg.model,
        "object": "model",
        "created": 0,
        "owned_by": "fairway-sim",
        "max_model_len": engine.max_model_len,
    }
    return json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def build_app(cfg: SimEngineConfig) -> web.Application:
    """An aiohttp application serving one simulated engine."""
    app = web.Application()

    async def lifecycle(app: web.Application) -> Any:
        engine = SimEngine(cfg)
        app[ENGINE_KEY] = engine
        app[METRICS_KEY] = SimMetrics(engine)
        engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_view)
    return app
