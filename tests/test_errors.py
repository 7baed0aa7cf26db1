"""Every malformed request gets a 4xx with an OpenAI-shaped body; no input yields a 5xx."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, config_dict, free_port

Served = tuple[TestServer, Gateway]
AUTH = {"Authorization": f"Bearer {ACME}", "Content-Type": "application/json"}
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]


def assert_openai_error(body: bytes, status: int) -> dict[str, Any]:
    obj = orjson.loads(body)
    assert set(obj) == {"error"}
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert b"Traceback" not in body
    return dict(err)


BAD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("not json", b"{model:", None),
    ("empty", b"", None),
    ("array", b"[1, 2]", None),
    ("null", b"null", None),
    ("no model", orjson.dumps({"messages": MSGS}), "model"),
    ("model not a string", orjson.dumps({"model": 3, "messages": MSGS}), "model"),
    ("no messages", orjson.dumps({"model": MODEL}), "messages"),
    ("messages not a list", orjson.dumps({"model": MODEL, "messages": "hi"}), "messages"),
    ("empty messages", orjson.dumps({"model": MODEL, "messages": []}), "messages"),
    ("message not an object", orjson.dumps({"model": MODEL, "messages": ["hi"]}), "messages[0]"),
    ("bad role", orjson.dumps({"model": MODEL, "messages": [{"role": "x", "content": "a"}]}),
     "messages[0].role"),
    ("content a number", orjson.dumps({"model": MODEL, "messages": [{"role": "user",
     "content": 5}]}), "messages[0].content"),
    ("max_tokens a string", orjson.dumps({"model": MODEL, "messages": MSGS, "max_tokens": "9"}),
     "max_tokens"),
    ("max_tokens zero", orjson.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 0}),
     "max_tokens"),
    ("max_tokens a bool", orjson.dumps({"model": MODEL, "messages": MSGS, "max_tokens": True}),
     "max_tokens"),
    ("stream a string", orjson.dumps({"model": MODEL, "messages": MSGS, "stream": "yes"}),
     "stream"),
    ("temperature too high", orjson.dumps({"model": MODEL, "messages": MSGS,
     "temperature": 9}), "temperature"),
    ("top_p a string", orjson.dumps({"model": MODEL, "messages": MSGS, "top_p": "1"}), "top_p"),
    ("n negative", orjson.dumps({"model": MODEL, "messages": MSGS, "n": -1}), "n"),
    ("stop a number", orjson.dumps({"model": MODEL, "messages": MSGS, "stop": 3}), "stop"),
    ("stream_options without stream", orjson.dumps({"model": MODEL, "messages": MSGS,
     "stream_options": {"include_usage": True}}), "stream_options"),
    ("metadata a list", orjson.dumps({"model": MODEL, "messages": MSGS, "metadata": [1]}),
     "metadata"),
    ("invalid utf-8", b'{"model": "\xff\xfe"}', None),
    # Valid but for the number: past 64 bits it decodes as a float, and max_tokens is named.
    ("huge number", b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}],'
     b' "max_tokens": 99999999999999999999}', "max_tokens"),
    # Past a double's range it is no JSON number the decoder accepts: an invalid body.
    ("infinite number", b'{"model": "llama-3.1-8b", "messages": [{"role": "user", "content":'
     b' "hi"}], "max_tokens": 1e999}', None),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "raw", "param"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_malformed_chat_body_is_400(
    gateway: Served, http: aiohttp.ClientSession, name: str, raw: bytes, param: str | None
) -> None:
    server, _ = gateway
    async with http.post(server.make_url(CHAT), data=raw, headers=AUTH) as r:
        body = await r.read()
        assert r.status == 400, body
    err = assert_openai_error(body, 400)
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
        assert param.split("[")[0] in err["message"]


@pytest.mark.parametrize(
    "prompt", [None, 5, [], [1.5], [{"a": 1}], [[1, "x"]]], ids=lambda p: repr(p)
)
async def test_malformed_completion_prompt_is_400(
    gateway: Served, http: aiohttp.ClientSession, prompt: Any
) -> None:
    server, _ = gateway
    body = {"model": MODEL, "max_tokens": 3}
    if prompt is not None:
        body["prompt"] = prompt
    async with http.post(server.make_url("/v1/completions"), json=body, headers=AUTH) as r:
        assert r.status == 400
        assert assert_openai_error(await r.read(), 400)["param"] == "prompt"


async def test_body_over_limit_is_413(start_gateway: Any, http: aiohttp.ClientSession) -> None:
    server, _ = await start_gateway(config_dict(max_body_bytes=2048))
    big = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]})
    async with http.post(server.make_url(CHAT), data=big, headers=AUTH) as r:
        assert r.status == 413
        err = assert_openai_error(await r.read(), 413)
    assert "2048" in err["message"]


async def test_auth_errors_are_401(client: openai.AsyncOpenAI, gateway: Served) -> None:
    server, _ = gateway
    base = str(server.make_url("/v1"))
    bad = openai.AsyncOpenAI(base_url=base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        await bad.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    assert exc.value.status_code == 401
    assert exc.value.code == "invalid_api_key"
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}):
            async with http.post(server.make_url(CHAT), json={}, headers=headers) as r:
                assert r.status == 401
                assert_openai_error(await r.read(), 401)
            async with http.get(server.make_url("/v1/models"), headers=headers) as r:
                assert r.status == 401


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        await client.chat.completions.create(model="gpt-9", messages=MSGS)  # type: ignore[arg-type]
    assert exc.value.code == "model_not_found"
    assert "gpt-9" in exc.value.message


async def test_wrong_method_and_path(gateway: Served, http: aiohttp.ClientSession) -> None:
    server, _ = gateway
    async with http.get(server.make_url(CHAT), headers=AUTH) as r:
        assert r.status == 405
        assert "POST" in r.headers["Allow"]
        assert_openai_error(await r.read(), 405)
    async with http.put(server.make_url("/v1/models"), headers=AUTH) as r:
        assert r.status == 405
    async with http.post(server.make_url("/v1/embeddingz"), headers=AUTH) as r:
        assert r.status == 404
        assert_openai_error(await r.read(), 404)


async def test_engine_rejection_is_relayed(client: openai.AsyncOpenAI) -> None:
    """The engine judges what the gateway does not: a prompt past the context window."""
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=10**6)  # type: ignore[arg-type]
    assert "maximum context length" in exc.value.message
    assert exc.value.param == "max_tokens"


async def test_no_healthy_engine_is_503_with_retry_after(
    start_gateway: Any, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": dead}]}})
    server, _gw = await start_gateway(cfg)
    body = {"model": MODEL, "messages": MSGS}
    for _ in range(2):  # first the connection fails, then the engine is already ejected
        async with http.post(server.make_url(CHAT), json=body, headers=AUTH) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "1"
            err = assert_openai_error(await r.read(), 503)
            assert err["code"] == "no_healthy_engine"
    async with http.get(server.make_url("/healthz")) as r:
        assert r.status == 503


async def test_slow_body_is_408_not_a_hung_connection(start_gateway: Any) -> None:
    import asyncio

    server, _ = await start_gateway(config_dict(body_timeout_s=0.2))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ACME.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"'
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()


async def test_non_utf8_header_bytes_are_401_not_500(gateway: Served) -> None:
    import asyncio

    server, gw = gateway
    engine_url = gw.registry.engines["us-east/llama-3.1-8b/0"].url
    for host, port, path in (
        (server.host, server.port, CHAT),
        ("127.0.0.1", int(engine_url.rsplit(":", 1)[1]), CHAT),
    ):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer sk-\xff\xfe\r\nContent-Length: 2\r\n\r\n{}"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        writer.close()
        status = int(head.split(b" ")[1])
        # The gateway refuses the key; the keyless sim engine judges the body ({}: no model).
        assert status == (401 if port == server.port else 404), head
