"""The gate core's ledger with plain values: charges, retries, finishes and engines leaving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.config.schema import parse
from gateway.core.dispatch import Decision
from gateway.core.gate import GateCore
from gateway.core.request import Endpoint, RequestInfo
from gateway.http.auth import digest

MODEL = "m"


@dataclass
class _Engine:
    id: str
    region: str = "r"
    model: str = MODEL
    routable: bool = True
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight_at_scrape: int = 0


class _Fleet:
    def __init__(self, *ids: str) -> None:
        self.engines = [_Engine(i) for i in ids]

    def engines_of(self, model: str) -> list[_Engine]:
        return [e for e in self.engines if e.model == model]


class _First:
    name = "first"

    def choose(self, request: Any, engines: Any) -> str:
        return str(engines[0].id)


def _core(max_running: int = 1) -> tuple[GateCore, _Fleet]:
    cfg = parse({
        "tenants": {"t": {"keys": [{"sha256": digest("k"), "app": "default"}]}},
        "engines": {"r": {MODEL: [{"kind": "vllm", "url": "http://127.0.0.1:1", "id": i,
                                   "max_running": max_running, "gpu": "H100",
                                   "arch": "llama-3.1-8b"} for i in ("a", "b")]}},
    })  # fmt: skip
    fleet = _Fleet("a", "b")
    return GateCore(cfg, fleet, _First()), fleet


def _info(rid: str = "same-id") -> RequestInfo:
    # Every request here carries the same id, as clients that reuse X-Request-Id send.
    return RequestInfo(rid, "t", "default", None, MODEL, Endpoint.CHAT, 100, 50, True, False,
                       0.0, predicted_output_tokens=40)  # fmt: skip


def _submit(core: GateCore) -> Any:
    info = _info()
    return core.submit(info, core.prepare(info, 0.0), 0.0)


def test_requests_sharing_an_id_are_charged_apart_and_released() -> None:
    core, _ = _core()
    (d1, s1), (d2, s2), (d3, s3) = _submit(core), _submit(core), _submit(core)
    assert (d1, s1.engine, d2, s2.engine, d3) == (Decision.START, "a", Decision.START, "b",
                                                  Decision.QUEUED)  # fmt: skip
    assert s1.handle != s2.handle != s3.handle
    a = core.ledger.loads["a"]
    assert (a.requests, a.prompt_tokens, a.decode_tokens, a.kv_tokens) == (1, 100, 40, 140)
    started, delta = core.finish(s1, 100, 10, 1.0)
    assert started == [s3] and s3.engine == "a"
    assert delta == (100 + 10) - s1.cost
    core.finish(s2, None, None, 1.0)
    core.finish(s3, 100, 50, 2.0)
    assert core.finish(s3, 100, 50, 2.0) == ([], 0.0)  # a second finish changes nothing
    assert core.ledger.total() == 0 and core.slots == {}
    assert all(load.requests == load.kv_tokens == 0 for load in core.ledger.loads.values())


def test_a_retry_moves_the_whole_charge() -> None:
    core, _ = _core(max_running=4)
    _, s = _submit(core)
    assert s.engine == "a"
    assert core.reroute(s, ["a"], 0.5) == "b"
    a, b = core.ledger.loads["a"], core.ledger.loads["b"]
    assert (a.requests, a.prompt_tokens, a.kv_tokens) == (0, 0, 0)
    assert (b.requests, b.prompt_tokens, b.decode_tokens, b.kv_tokens) == (1, 100, 40, 140)
    assert core.reroute(s, ["a", "b"], 0.6) is None  # nothing left to try: charge stays
    core.finish(s, None, None, 1.0)
    assert core.ledger.total() == 0


def test_draining_engines_take_nothing_and_leave_no_charge() -> None:
    core, fleet = _core(max_running=4)
    released: list[str] = []
    core.on_release = released.append
    _, s1 = _submit(core)
    fleet.engines[0].routable = False  # a draining: new requests go elsewhere
    _, s2 = _submit(core)
    assert (s1.engine, s2.engine) == ("a", "b")
    assert [e.id for e in core.snapshots(MODEL)] == ["b"]
    core.finish(s1, None, None, 1.0)
    assert released == ["a"] and core.ledger.in_flight("a") == 0
    # An engine that leaves with a request still on it takes the charge with it.
    core.drop_engine("b")
    assert core.ledger.total() == 0 and "b" not in core.ledger.loads
    core.finish(s2, None, None, 2.0)  # its end, later, finds nothing to release
    assert core.ledger.total() == 0


def test_cancelled_waiting_requests_hold_nothing() -> None:
    core, _ = _core()
    _, s1 = _submit(core)
    _, s2 = _submit(core)
    d3, s3 = _submit(core)
    assert d3 is Decision.QUEUED
    assert core.cancel(s3) and s3.done and s3.handle not in core.slots
    assert core.finish(s1, None, None, 1.0)[0] == []  # nothing left waiting to start
    core.finish(s2, None, None, 1.0)
    assert core.ledger.total() == 0 and core.slots == {}
