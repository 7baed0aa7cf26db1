"""Pure pieces: key digests, usage filtering of SSE events, vLLM metrics parsing, routing."""

from __future__ import annotations

import orjson
import pytest

from gateway.config.schema import TenantConfig
from gateway.core.errors import ApiError
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import Endpoint, RequestInfo
from gateway.fleet.health import parse_vllm_metrics
from gateway.http import auth
from gateway.http.auth import KeyRing, digest
from gateway.routing.policies import LeastOutstanding
from gateway.upstream.sse import Usage, filter_event


def test_keyring_resolves_tenant_and_app() -> None:
    ring = KeyRing({"t": TenantConfig("t", 1.0, {}, {digest("k1"): "a", digest("k2"): "b"})})
    assert ring.authenticate("Bearer k2").app == "b"
    assert ring.authenticate("bearer  k1 ").tenant == "t"
    # The last: header bytes that are not UTF-8 (aiohttp hands them over as surrogates).
    for header in (None, "", "Bearer", "Token k1", "Bearer k3", "Bearer sk-\udcff\udcfe"):
        with pytest.raises(ApiError) as exc:
            ring.authenticate(header)
        assert exc.value.status == 401


def test_keyring_remembers_only_matching_headers_within_its_bound() -> None:
    ring = KeyRing({"t": TenantConfig("t", 1.0, {}, {digest("k1"): "a"})})
    for _ in range(3):  # remembered after the first, answered the same
        assert ring.authenticate("Bearer k1").app == "a"
    for i in range(3 * auth.KNOWN_HEADERS):  # fresh keys, every one refused, none kept
        with pytest.raises(ApiError):
            ring.authenticate(f"Bearer guess-{i}")
    assert list(ring._known) == ["Bearer k1"]
    # A ring built from a config without the key (a reload) refuses the header it knew.
    with pytest.raises(ApiError):
        KeyRing({"t": TenantConfig("t", 1.0, {}, {digest("k2"): "a"})}).authenticate("Bearer k1")


USAGE = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n'
TOKEN = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'


def test_usage_chunk_recorded_and_hidden_unless_asked() -> None:
    out = Usage()
    assert filter_event(TOKEN, False, out) == TOKEN
    assert filter_event(USAGE, False, out) is None
    assert (out.prompt_tokens, out.completion_tokens) == (5, 9)
    assert filter_event(USAGE, True, Usage()) == USAGE
    mixed = b'data: {"choices":[{"index":0}],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    kept = filter_event(mixed, False, out)
    assert kept is not None
    assert "usage" not in orjson.loads(kept.removeprefix(b"data: "))


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_running x
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{model_name="m"} 7
vllm:kv_cache_usage_perc{model_name="m"} 0.25
vllm:num_requests_waiting_by_reason{reason="x"} 9
garbage line
vllm:kv_cache_usage_perc{model_name="m"} NaN
"""
    assert parse_vllm_metrics(text) == {"running": 5.0, "waiting": 7.0, "kv_usage": 0.25}


def snap(eid: str, in_flight: int, waiting: int = 0) -> EngineSnapshot:
    return EngineSnapshot(id=eid, region="r", model="m", waiting=waiting, in_flight=in_flight)


def test_least_outstanding_prefers_idle_then_rotates() -> None:
    info = RequestInfo("r", "t", "a", None, "m", Endpoint.CHAT, 10, None, False, False, 0.0)
    policy = LeastOutstanding()
    assert policy.choose(info, [snap("a", 3), snap("b", 1), snap("c", 2)]) == "b"
    assert policy.choose(info, [snap("a", 1, waiting=4), snap("b", 1)]) == "b"
    equal = [snap("a", 0), snap("b", 0), snap("c", 0)]
    assert {policy.choose(info, equal) for _ in range(3)} == {"a", "b", "c"}


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    import gc

    from gateway.http.serve import _tune_gc

    before = gc.get_threshold()
    try:
        _tune_gc()
        assert gc.get_freeze_count() > 1000  # the modules, config and tables built so far
        assert gc.get_threshold() == (20_000, 20, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
