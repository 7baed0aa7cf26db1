"""Hostile request parameters: n and best_of are priced and, with logprobs, capped per tenant;
fields meant for the engine alone are refused; the body reaches the engine as sent, with the
tenant's cache salt. Each refusal is an OpenAI-shaped 400 naming its parameter, and the gateway
serves the next request as before."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from engines.tokens import completion_prompt_tokens
from gateway.config.schema import ConfigError, parse
from gateway.core.admission import Admission
from gateway.core.request import Endpoint, RequestInfo
from gateway.http.request import REFUSED, cache_salt
from tests.conftest import MODEL, config_dict
from tests.test_hostile_bodies import CHAT, JSON, MSGS, Served, assert_healthy, client_of

GLOBEX = "sk-test-globex-chat"

# --- 1. n and best_of are priced; n, best_of and logprobs are capped per tenant.


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


# --- 2. Pass-through policy.


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
