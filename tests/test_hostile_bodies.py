"""Hostile request bodies: each gets an OpenAI-shaped 4xx naming its field, nothing internal
leaks, and the gateway serves the next request as before."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.http.request import MAX_DEPTH, MAX_ID_CHARS
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, config_dict
from tests.test_errors import assert_openai_error

Served = tuple[TestServer, Gateway]
CHAT = "/v1/chat/completions"
MSGS = [{"role": "user", "content": "hi"}]
JSON = {"Authorization": f"Bearer {ACME}", "Content-Type": "application/json"}


def client_of(server: TestServer, key: str = ACME) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=key, max_retries=0, timeout=30
    )


async def assert_healthy(server: TestServer) -> None:
    """The gateway still serves an ordinary request, and /healthz says so."""
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 3}
        async with http.post(server.make_url(CHAT), json=body, headers=JSON) as r:
            assert r.status == 200, await r.read()
        async with http.get(server.make_url("/healthz")) as r:
            assert r.status == 200


async def post_raw(
    server: TestServer, data: bytes, headers: dict[str, str], path: str = CHAT
) -> tuple[int, bytes]:
    # A fresh connection per call, sent as it is: no compression of the client's own.
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, auto_decompress=False) as http,
        http.post(server.make_url(path), data=data, headers={**JSON, **headers}) as r,
    ):
        return r.status, await r.read()


def chat(**extra: Any) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": MSGS, "max_tokens": 3, **extra})


# --- 1. The decoded body is what the size limit bounds.


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compression_bomb_is_413(start_gateway: Any, encoding: str, compress: Any) -> None:
    server, _ = await start_gateway(config_dict(max_body_bytes=64 * 1024))
    bomb = compress(chat(user="x" * (64 << 20)))  # 64 MiB that travel as about 64 KiB
    assert len(bomb) < 256 * 1024
    status, body = await post_raw(server, bomb, {"Content-Encoding": encoding})
    assert status == 413, body
    err = assert_openai_error(body, 413)
    assert err["code"] == "request_too_large"
    assert str(64 * 1024) in err["message"]
    await assert_healthy(server)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP"])
async def test_compressed_body_within_limit_is_served(gateway: Served, encoding: str) -> None:
    server, _ = gateway
    data = gzip.compress(chat()) if encoding.lower() == "gzip" else zlib.compress(chat())
    status, body = await post_raw(server, data, {"Content-Encoding": encoding})
    assert status == 200, body
    assert orjson.loads(body)["object"] == "chat.completion"


async def test_raw_deflate_is_served_as_well(gateway: Served) -> None:
    """RFC 9110's deflate is zlib-wrapped; some clients send it raw, and both are taken."""
    server, _ = gateway
    squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    data = squeeze.compress(chat()) + squeeze.flush()
    status, body = await post_raw(server, data, {"Content-Encoding": "deflate"})
    assert status == 200, body


BAD_ENCODINGS = [
    ("corrupt gzip", b"\x1f\x8b\x08\x00garbage-garbage", "gzip"),
    ("gzip header, plain body", chat(), "gzip"),
    ("corrupt deflate", b"x\x9c" + b"\xff" * 40, "deflate"),
    ("unknown coding", chat(), "x-unknown"),
    ("two codings", gzip.compress(gzip.compress(chat())), "gzip, gzip"),
    ("brotli", chat(), "br"),
    ("corrupt brotli", b"\x28\xb5\x2f\xfd garbage", "br"),
    ("zstd", b"\x28\xb5\x2f\xfd\x00\x58garbage", "zstd"),
    ("truncated gzip", gzip.compress(chat())[:-12], "gzip"),
    ("raw deflate, cut short", zlib.compress(chat())[2:-20], "deflate"),
]


@pytest.mark.parametrize(
    ("name", "data", "encoding"), BAD_ENCODINGS, ids=[b[0] for b in BAD_ENCODINGS]
)
async def test_bad_content_encoding_is_400(
    gateway: Served, name: str, data: bytes, encoding: str
) -> None:
    server, _ = gateway
    status, body = await post_raw(server, data, {"Content-Encoding": encoding})
    assert status == 400, body
    err = assert_openai_error(body, 400)
    assert err["param"] == "Content-Encoding"
    assert b"zlib" not in body and b"Error -3" not in body
    await assert_healthy(server)


async def test_fairway_serve_answers_codings_aiohttp_cannot_decode(tmp_path: Any) -> None:
    """`fairway serve` decodes bodies itself: a corrupt brotli stream or zstd (which aiohttp
    would answer in plain text, or by dropping the connection) gets an OpenAI-shaped 400."""
    from tests.serving import serving

    async with serving(config_dict(), tmp_path) as (_, base, _log):
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
            for data, encoding in [(b"\x28\xb5\x2f\xfd garbage", "br"),
                                   (b"\x28\xb5\x2f\xfd\x00\x58garbage", "zstd"),
                                   (gzip.compress(chat())[:-12], "gzip")]:  # fmt: skip
                headers = {**JSON, "Content-Encoding": encoding}
                async with http.post(f"{base}{CHAT}", data=data, headers=headers) as r:
                    body = await r.read()
                assert r.status == 400, body
                assert assert_openai_error(body, 400)["param"] == "Content-Encoding"
            async with http.post(f"{base}{CHAT}", data=gzip.compress(chat()),
                                 headers={**JSON, "Content-Encoding": "gzip"}) as r:  # fmt: skip
                assert r.status == 200, await r.read()


# --- 2. Nesting depth.


def nest(levels: int, leaf: Any = "a") -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


DEEP = 300
NESTED: list[tuple[str, str, dict[str, Any], str]] = [
    ("prompt", "/v1/completions", {"prompt": nest(DEEP)}, "prompt"),
    ("content part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a", "x": nest(DEEP)}]}]}, "messages"),
    ("tools", CHAT, {"tools": [{"type": "function", "function": {"name": "f",
     "parameters": {"items": nest(DEEP, {})}}}]}, "tools"),
    ("response_format", CHAT, {"response_format": {"type": "json_schema",
     "json_schema": {"name": "s", "schema": nest(DEEP, {})}}}, "response_format"),
    ("metadata", CHAT, {"metadata": {"k": nest(DEEP)}}, "metadata"),
    ("unknown field", CHAT, {"guided_json": nest(DEEP, {})}, "guided_json"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "fields", "param"), NESTED, ids=[n[0] for n in NESTED])
async def test_deep_nesting_is_400_naming_the_field(
    gateway: Served, name: str, path: str, fields: dict[str, Any], param: str
) -> None:
    server, _ = gateway
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, **fields}
    if path == CHAT:
        body.setdefault("messages", MSGS)
    client = client_of(server)
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post(path[3:], body=body, cast_to=object)
    assert exc.value.status_code == 400
    assert exc.value.param == param
    assert str(MAX_DEPTH) in exc.value.message
    await assert_healthy(server)


async def test_nesting_past_the_decoders_limit_is_400(gateway: Served) -> None:
    server, _ = gateway
    raw = b'{"model": "llama-3.1-8b", "messages": [], "metadata": {"k": ' + b"[" * 2000
    status, body = await post_raw(server, raw + b"]" * 2000 + b"}}", {})
    assert status == 400, body
    assert "nested deeper" in assert_openai_error(body, 400)["message"]
    await assert_healthy(server)


async def test_nesting_up_to_the_bound_is_served(gateway: Served) -> None:
    server, _ = gateway
    client = client_of(server)
    # The body is level 1, metadata level 2, then the lists.
    at_bound = {"metadata": {"k": nest(MAX_DEPTH - 2)}}
    r = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3,  # type: ignore[arg-type]
                                             extra_body=at_bound)  # fmt: skip
    assert r.choices
    past = {"metadata": {"k": nest(MAX_DEPTH - 1)}}
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3,  # type: ignore[arg-type]
                                             extra_body=past)  # fmt: skip
    assert exc.value.param == "metadata"


# --- 3. Strings the gateway keeps.

LONG = "x" * (MAX_ID_CHARS + 1)
STRINGS: list[tuple[str, dict[str, Any], str]] = [
    ("interaction header", {"extra_headers": {"X-Fairway-Interaction": LONG}},
     "X-Fairway-Interaction"),
    ("metadata.interaction_id", {"extra_body": {"metadata": {"interaction_id": LONG}}},
     "metadata.interaction_id"),
    ("interaction_id an object", {"extra_body": {"metadata": {"interaction_id": {"a": 1}}}},
     "metadata.interaction_id"),
    ("user", {"user": LONG}, "user"),
    ("user a number", {"extra_body": {"user": 5}}, "user"),
    ("regions header", {"extra_headers": {"X-Fairway-Regions": "eu-west," * 40}},
     "X-Fairway-Regions"),
    ("too many regions", {"extra_headers": {"X-Fairway-Regions": ",".join("r" * 9)}},
     "X-Fairway-Regions"),
    ("cache_salt", {"extra_body": {"cache_salt": LONG}}, "cache_salt"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kw", "param"), STRINGS, ids=[s[0] for s in STRINGS])
async def test_long_strings_are_400_naming_the_field(
    gateway: Served, name: str, kw: dict[str, Any], param: str
) -> None:
    server, _ = gateway
    with pytest.raises(openai.BadRequestError) as exc:
        await client_of(server).chat.completions.create(
            model=MODEL,
            messages=MSGS,  # type: ignore[arg-type]
            max_tokens=3,
            **kw,
        )
    assert exc.value.param == param
    assert LONG not in exc.value.message
    await assert_healthy(server)


async def test_long_model_name_is_400_not_echoed(gateway: Served) -> None:
    server, _ = gateway
    model = "m" * 100_000
    with pytest.raises(openai.BadRequestError) as exc:
        await client_of(server).chat.completions.create(model=model, messages=MSGS)  # type: ignore[arg-type]
    assert exc.value.param == "model"
    assert len(exc.value.response.content) < 1000


async def test_strings_at_the_bound_are_served(gateway: Served) -> None:
    server, _ = gateway
    at = "y" * MAX_ID_CHARS
    r = await client_of(server).chat.completions.create(
        model=MODEL,
        messages=MSGS,  # type: ignore[arg-type]
        max_tokens=3,
        user=at,
        metadata={"interaction_id": at},
        extra_headers={"X-Fairway-Regions": ",".join(["eu-west"] * 8), "X-Fairway-Interaction": at},
    )
    assert r.choices
