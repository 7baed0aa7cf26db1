"""Routing policies with plain values, region preference, and predicted-latency in the simulator."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import openai
import pytest

from benchmarks.routing_sim import config, fleet, frontend, make_job, simulate, specs_of, summarise
from benchmarks.routing_workload import Row, requests
from gateway.core.ledger import EngineSnapshot
from gateway.core.request import Endpoint, RequestInfo
from gateway.routing.latency import EngineProfile, PredictedLatency, build_policy, prefer_regions
from gateway.routing.policies import POLICY_NAMES, PowerOfTwo, RoundRobin
from tests.conftest import ACME, MODEL, GatewayFactory


def req(prompt: int = 100, out: int | None = 100, regions: tuple[str, ...] = ()) -> RequestInfo:
    return RequestInfo("r", "t", "a", None, "m", Endpoint.CHAT, prompt, None, False, False, 0.0,
                       regions, out, out)  # fmt: skip


def snap(eid: str, in_flight: int = 0, prompt: int = 0, decode: int = 0, region: str = "r0",
         running: int = 0, waiting: int = 0, kv: float = 0.0,
         at_scrape: int = 0) -> EngineSnapshot:  # fmt: skip
    return EngineSnapshot(id=eid, region=region, model="m", running=running, waiting=waiting,
                          kv_usage=kv, in_flight=in_flight, in_flight_prompt_tokens=prompt,
                          in_flight_decode_tokens=decode,
                          in_flight_at_scrape=at_scrape)  # fmt: skip


def test_round_robin_cycles() -> None:
    rr = RoundRobin()
    engines = [snap("a"), snap("b"), snap("c")]
    assert [rr.choose(req(), engines) for _ in range(4)] == ["a", "b", "c", "a"]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("jsq", "b"),  # fewest running + waiting as scraped
        ("least-outstanding", "c"),  # fewest in flight from the gateway
        ("least-tokens", "a"),  # fewest prompt + decode tokens in flight
    ],
)
def test_baselines_pick_their_least_loaded(policy: str, expected: str) -> None:
    engines = [
        snap("a", in_flight=5, prompt=100, decode=100, running=5, waiting=1),
        snap("b", in_flight=4, prompt=9000, decode=100, running=1, waiting=0),
        snap("c", in_flight=2, prompt=8000, decode=4000, running=6, waiting=2),
    ]
    assert build_policy(policy).choose(req(), engines) == expected


def test_power_of_two_never_picks_the_busier_of_its_pair() -> None:
    p2 = PowerOfTwo(seed=3)
    engines = [snap("idle"), snap("busy", in_flight=50)]
    assert {p2.choose(req(), engines) for _ in range(20)} == {"idle"}


def test_every_configured_name_builds() -> None:
    for name in POLICY_NAMES:
        assert build_policy(name).name == name
    with pytest.raises(KeyError, match="unknown routing policy"):
        build_policy("random")


def test_predicted_latency_prefers_the_idle_engine_and_the_faster_gpu() -> None:
    pl = PredictedLatency(
        {"h100": EngineProfile.named("H100"), "a100": EngineProfile.named("A100")}
    )
    busy = snap("h100", in_flight=120, prompt=150_000, decode=30_000)
    assert pl.choose(req(), [busy, snap("a100")]) == "a100"
    assert pl.choose(req(), [snap("h100"), snap("a100")]) == "h100"


def test_long_decode_avoids_heavy_kv_and_short_one_tolerates_it() -> None:
    """Decode-heavy mixing: a long generation costs most where every step reads the most KV."""
    pl = PredictedLatency()
    heavy_kv = snap("kv", in_flight=40, prompt=160_000, decode=4_000)
    many_short = snap("many", in_flight=60, prompt=6_000, decode=3_000)
    long_cost = [pl.cost(e, 200, 2000) for e in (heavy_kv, many_short)]
    assert long_cost[0] > long_cost[1]
    # The prompt-heavy request costs others through its prefill: more streams, more delay.
    quiet = snap("quiet", in_flight=5, prompt=5_000, decode=500)
    assert pl.cost(quiet, 6000, 10) < pl.cost(many_short, 6000, 10)


def test_stale_gauges_count_only_the_load_the_gateway_did_not_send() -> None:
    """The gauges lag the ledger: of an engine's scraped running + waiting, what the gateway
    had in flight there at the scrape is its own, counted fresh from the ledger instead."""
    pl = PredictedLatency()
    load = {"in_flight": 10, "prompt": 10_000, "decode": 2_000}
    # Scraped with 60 of the gateway's requests there; 50 of them have ended since.
    stale = snap("stale", **load, running=60, at_scrape=60)
    fresh = snap("fresh", **load, running=10, at_scrape=10)
    # Scraped idle; the gateway has sent its 10 since.
    unseen = snap("unseen", **load)
    assert pl.cost(stale, 500, 200) == pl.cost(fresh, 500, 200) == pl.cost(unseen, 500, 200)
    assert {pl.choose(req(), [stale, fresh]) for _ in range(4)} == {"stale", "fresh"}
    # 50 of the 60 scraped are other clients' requests: they still weigh on the engine.
    foreign = snap("foreign", **load, running=60, at_scrape=10)
    assert pl.cost(foreign, 500, 200) > pl.cost(fresh, 500, 200)
    assert {pl.choose(req(), [foreign, fresh]) for _ in range(4)} == {"fresh"}
    # More of its own at the scrape than the engine reported: no negative foreign load.
    early = snap("early", **load, running=5, at_scrape=8)
    assert pl.cost(early, 500, 200) == pl.cost(fresh, 500, 200)
    # Region utilisation reads the same counts.
    prof = EngineProfile.named()
    hot_stale = [replace(stale, region="east", running=250, in_flight_at_scrape=250)]
    hot_foreign = [replace(foreign, region="east", running=250)]
    west = [snap("w1", region="west", kv=0.1)]
    r = req(regions=("east",))
    assert [e.id for e in prefer_regions(r, hot_stale + west, 0.7, {}, prof)] == ["stale"]
    assert [e.id for e in prefer_regions(r, hot_foreign + west, 0.7, {}, prof)] == ["w1"]


def test_region_preference_stays_until_the_threshold() -> None:
    prof = EngineProfile.named()
    default = prof
    east = [snap("e1", region="east", kv=0.5), snap("e2", region="east", kv=0.6)]
    west = [snap("w1", region="west", kv=0.1)]
    r = req(regions=("east",))
    assert {e.id for e in prefer_regions(r, east + west, 0.7, {}, default)} == {"e1", "e2"}
    hot = [replace(e, kv_usage=0.9) for e in east]
    assert [e.id for e in prefer_regions(r, hot + west, 0.7, {}, default)] == ["w1"]
    # No preference: every engine stays a candidate.
    assert len(prefer_regions(req(), hot + west, 0.7, {}, default)) == 3
    pl = PredictedLatency(region_threshold=0.7)
    assert pl.choose(r, [*west, *east]) in {"e1", "e2"}
    assert pl.choose(r, [*west, *hot]) == "w1"


def test_predicted_latency_beats_round_robin_in_the_simulator() -> None:
    """Two bursts of a mixed workload on four engines near their capacity, through the gate
    core as the gateway runs it (gauges scraped every 2 s), and with gauges fresh at every
    decision, where predicted-latency reads the engines' load exactly."""
    rng = random.Random(5)
    rows = sorted(
        (Row(rng.uniform(0, 25), rng.choice((200, 900, 2500)), rng.choice((20, 150, 500)))
         for _ in range(1800)),
        key=lambda r: r.t,
    )  # fmt: skip
    jobs = [make_job(str(i), r.t, r.tenant, r.app, r.body, r.output_tokens)
            for i, r in enumerate(requests(rows))]  # fmt: skip
    for scrape, gain in ((None, 0.98), (0.0, 0.95)):
        mean = {}
        for name in ("round-robin", "predicted-latency"):
            cfg = config(fleet(4), name)
            done = simulate(specs_of(cfg), frontend(cfg, scrape_interval=scrape), jobs)
            mean[name] = summarise(done).mean_e2e
        assert mean["predicted-latency"] < gain * mean["round-robin"], (scrape, mean)


async def test_gateway_routes_with_predictions_and_releases_its_counts(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0)
    assert gw.gate.core.router.name == "predicted-latency"  # the default

    async def one(n: int) -> int:
        resp = await client.chat.completions.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}],
            extra_body={"sim_output_tokens": n},
        )  # fmt: skip
        assert resp.usage is not None
        return resp.usage.completion_tokens

    assert await asyncio.gather(*(one(3 + i) for i in range(12))) == [3 + i for i in range(12)]
    for load in gw.gate.core.ledger.loads.values():
        assert (load.requests, load.prompt_tokens, load.decode_tokens, load.kv_tokens) == (0,) * 4

    async def served_by(regions: str) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-Fairway-Regions": regions},
        )  # fmt: skip
        assert raw.status_code == 200
        engine: str = raw.headers["x-fairway-engine"]
        assert engine in gw.registry.engines, engine
        return engine

    # The first known preferred region with room serves it; unknown names are skipped.
    for regions, region in (
        ("eu-west", "eu-west"),
        ("us-east", "us-east"),
        ("nowhere, eu-west", "eu-west"),
        ("mars,us-east,eu-west", "us-east"),
    ):
        assert (await served_by(regions)).startswith(f"{region}/{MODEL}/"), regions
    # No known region: the least utilised one serves it. A stream held open on us-east...
    hold = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8000, stream=True,
        extra_headers={"X-Fairway-Regions": "us-east"}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    try:
        async for _ in hold:
            break
        held = [e for e in gw.registry.engines if gw.gate.core.ledger.in_flight(e)]
        assert len(held) == 1 and held[0].startswith(f"us-east/{MODEL}/"), held
        # ...leaves eu-west the least utilised region.
        assert (await served_by(",,nowhere,")).startswith(f"eu-west/{MODEL}/")
    finally:
        await hold.close()
