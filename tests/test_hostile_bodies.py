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
from aiohttp import web
from aiohttp.test_utils import TestServer

from engines.tokens import completion_prompt_tokens
from gateway.config.schema import ConfigError, parse
from gateway.core.admission import Admission
from gateway.core.request import Endpoint, RequestInfo
from gateway.http.request import MAX_DEPTH, MAX_ID_CHARS, REFUSED, cache_salt
from gateway.http.state import Gateway
from tests.conftest import ACME, MODEL, config_dict
from tests.test_errors import assert_openai_error

Served = tuple[TestServer, Gateway]
GLOBEX = "sk-test-globex-chat"
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


# --- 4. n and best_of are priced; n, best_of and logprobs are capped per tenant.


def _priced_config(**tenant: Any) -> dict[str, Any]:
    cfg = config_dict()
    cfg["tenants"]["acme"].update(tokens_per_minute=60.0, burst_tokens=1e6, **tenant)
    return cfg


async def test_best_of_multiplies_the_bucket_charge(start_gateway: Any) -> None:
    prompt = "count the ways " * 20
    charged = {}
    for best_of in (1, 4):
        server, _ = await start_gateway(_priced_config())
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 10, "best_of": best_of}
        async with (
            aiohttp.ClientSession() as http,
            http.post(server.make_url("/v1/completions"), json=body, headers=JSON) as r,
        ):
            assert r.status == 200, await r.read()
            charged[best_of] = 1e6 - int(r.headers["x-ratelimit-remaining-tokens"])
    p = completion_prompt_tokens(prompt)
    one, four = charged[1] - p, charged[4] - p
    assert one >= 1
    assert abs(four - 4 * one) <= 2, charged


class _Idle:
    def overloaded(self, model: str) -> bool:
        return False


def test_admission_prices_every_completion() -> None:
    cfg = parse(config_dict())
    admission = Admission(cfg, _Idle())  # type: ignore[arg-type]
    base = RequestInfo("r", "acme", "chat", None, MODEL, Endpoint.CHAT, 100, 50, False, False,
                       0.0)  # fmt: skip
    one = admission.prepare(base, 0.0)
    four = admission.prepare(RequestInfo(**{**_fields(base), "n": 4}), 0.0)
    assert one.cost == 150 and one.ticket.expected_output == 50
    assert four.cost == 100 + 4 * 50
    assert four.ticket.expected_output == 200


def _fields(info: RequestInfo) -> dict[str, Any]:
    return {name: getattr(info, name) for name in RequestInfo.__slots__}


CAPS: list[tuple[str, str, dict[str, Any], str]] = [
    ("n", CHAT, {"n": 9}, "n"),
    ("best_of", "/v1/completions", {"best_of": 9}, "best_of"),
    ("top_logprobs", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("completions logprobs", "/v1/completions", {"logprobs": 21}, "logprobs"),
    ("prompt_logprobs", CHAT, {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("prompt_logprobs of the whole vocabulary", CHAT, {"prompt_logprobs": -1},
     "prompt_logprobs"),
    ("best_of a string", "/v1/completions", {"best_of": "2"}, "best_of"),
    ("chat logprobs a number", CHAT, {"logprobs": 3}, "logprobs"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "extra", "param"), CAPS, ids=[c[0] for c in CAPS])
async def test_over_a_cap_is_400_naming_the_parameter(
    gateway: Served, name: str, path: str, extra: dict[str, Any], param: str
) -> None:
    server, _ = gateway
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, **extra}
    body.update({"messages": MSGS} if path == CHAT else {"prompt": "hi"})
    with pytest.raises(openai.BadRequestError) as exc:
        await client_of(server).post(path[3:], body=body, cast_to=object)
    assert exc.value.param == param
    await assert_healthy(server)


async def test_caps_are_per_tenant(start_gateway: Any) -> None:
    cfg = config_dict()
    cfg["tenants"]["acme"].update(max_n=2, max_top_logprobs=1)
    server, _ = await start_gateway(cfg)
    acme, globex = client_of(server), client_of(server, GLOBEX)
    for extra, param in (({"n": 3}, "n"), ({"logprobs": True, "top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as exc:
            await acme.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3,  # type: ignore[arg-type]
                                               extra_body=extra)  # fmt: skip
        assert exc.value.param == param
        assert "at most" in exc.value.message
    # The other tenant keeps the defaults: its request reaches the engine, which judges n.
    with pytest.raises(openai.BadRequestError) as exc:
        await globex.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, n=3)  # type: ignore[arg-type]
    assert "simulated engine" in exc.value.message


@pytest.mark.parametrize(
    ("key", "value"), [("max_n", 0), ("max_top_logprobs", -1), ("cache_salt", "yes")]
)
def test_tenant_caps_are_validated(key: str, value: Any) -> None:
    cfg = config_dict()
    cfg["tenants"]["acme"][key] = value
    with pytest.raises(ConfigError) as exc:
        parse(cfg)
    assert f"tenants.acme.{key}" in str(exc.value)


# --- 5. Pass-through policy.


@pytest.mark.parametrize("field", sorted(REFUSED))
async def test_refused_vllm_fields_are_400(gateway: Served, field: str) -> None:
    server, _ = gateway
    value: Any = {"priority": -100, "request_id": "chatcmpl-other"}.get(field, {"a": "b"})
    with pytest.raises(openai.BadRequestError) as exc:
        await client_of(server).chat.completions.create(model=MODEL, messages=MSGS,  # type: ignore[arg-type]
                                                        extra_body={field: value})  # fmt: skip
    assert exc.value.param == field
    assert field in exc.value.message
    await assert_healthy(server)


@pytest.fixture
async def echo_engine(aiohttp_server: Any) -> tuple[str, list[dict[str, Any]]]:
    """An engine that records each body it gets and answers a fixed completion."""
    seen: list[dict[str, Any]] = []

    async def complete(request: web.Request) -> web.Response:
        seen.append(orjson.loads(await request.read()))
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post(CHAT, complete)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), seen


async def test_engine_gets_the_body_as_sent_with_the_tenants_cache_salt(
    start_gateway: Any, echo_engine: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = echo_engine
    cfg = config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
    server, _ = await start_gateway(cfg)
    acme, globex = client_of(server), client_of(server, GLOBEX)
    extensions = {"top_k": 5, "return_tokens_as_token_ids": True, "chat_template_kwargs": {
        "enable_thinking": False}, "guided_choice": ["a", "b"]}  # fmt: skip
    await acme.chat.completions.create(model=MODEL, messages=MSGS, extra_body=extensions)  # type: ignore[arg-type]
    await globex.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    # A client's own salt is folded into its tenant's, and another tenant's salt buys nothing.
    await acme.chat.completions.create(model=MODEL, messages=MSGS,  # type: ignore[arg-type]
                                       extra_body={"cache_salt": "user-7"})  # fmt: skip
    await globex.chat.completions.create(model=MODEL, messages=MSGS,  # type: ignore[arg-type]
                                         extra_body={"cache_salt": cache_salt("acme")})  # fmt: skip
    assert len(seen) == 4
    assert {k: seen[0][k] for k in extensions} == extensions
    assert seen[0]["messages"] == MSGS
    salts = [b["cache_salt"] for b in seen]
    assert salts[0] == cache_salt("acme")
    assert salts[1] == cache_salt("globex")
    assert salts[2] == cache_salt("acme", "user-7")
    assert salts[3] == cache_salt("globex", cache_salt("acme"))
    assert len(set(salts)) == 4
    assert "user-7" not in salts


async def test_unsalted_tenant_refuses_a_client_salt(
    start_gateway: Any, echo_engine: tuple[str, list[dict[str, Any]]]
) -> None:
    url, seen = echo_engine
    cfg = config_dict({"us-east": {MODEL: [{"kind": "vllm", "url": url}]}})
    cfg["tenants"]["acme"]["cache_salt"] = False
    server, _ = await start_gateway(cfg)
    acme = client_of(server)
    await acme.chat.completions.create(model=MODEL, messages=MSGS)  # type: ignore[arg-type]
    assert "cache_salt" not in seen[0]
    with pytest.raises(openai.BadRequestError) as exc:
        await acme.chat.completions.create(model=MODEL, messages=MSGS,  # type: ignore[arg-type]
                                           extra_body={"cache_salt": "mine"})  # fmt: skip
    assert exc.value.param == "cache_salt"
    assert len(seen) == 1


async def test_sim_engine_accepts_a_cache_salt(gateway: Served) -> None:
    _, gw = gateway
    url = gw.registry.engines["us-east/llama-3.1-8b/0"].url
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 3, "cache_salt": cache_salt("acme")}
    async with aiohttp.ClientSession() as http, http.post(f"{url}{CHAT}", json=body) as r:
        assert r.status == 200, await r.read()
