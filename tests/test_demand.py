"""Per-minute demand counters: what the planner forecasts from."""

from __future__ import annotations

import pytest

from gateway.core.demand import Demand, Point
from tests.test_gate import redis_server, redis_url  # noqa: F401  (fixtures)

KEY = ("llama-3.1-8b", "us-east", "interactive")


def test_requests_count_in_the_minute_they_end() -> None:
    d = Demand(keep_minutes=60)
    d.add(KEY, 120.0, prompt=100, output=20)
    d.add(KEY, 179.9, prompt=50, output=5)
    d.add(KEY, 240.0, prompt=7, output=1)
    assert d.series(KEY, 1, 5) == [
        Point(1, 0, 0, 0), Point(2, 2, 150, 25), Point(3, 0, 0, 0), Point(4, 1, 7, 1),
    ]  # fmt: skip
    assert d.keys() == [KEY]
    assert d.series(("other", "r", "batch"), 0, 10) == []


def test_only_the_last_keep_minutes_are_kept_in_bounded_memory() -> None:
    d = Demand(keep_minutes=10)
    for minute in range(100):
        d.add(KEY, minute * 60.0, prompt=minute)
    points = d.series(KEY, 0, 100)
    assert [p.minute for p in points] == list(range(90, 100))
    assert [p.prompt_tokens for p in points] == list(range(90, 100))
    d.add(KEY, 5 * 60.0, prompt=1)  # too old to keep: ignored, not wrapped onto minute 95
    assert d.series(KEY, 95, 96)[0].prompt_tokens == 95


def test_merge_adds_another_replicas_counts() -> None:
    a, b = Demand(), Demand()
    a.add(KEY, 60.0, prompt=10)
    b.add(KEY, 60.0, prompt=5)
    b.add(KEY, 120.0, prompt=1)
    a.merge(KEY, b.series(KEY, 0, 3))
    assert [p.prompt_tokens for p in a.series(KEY, 1, 3)] == [15, 1]


def test_keep_minutes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keep_minutes"):
        Demand(keep_minutes=0)


async def test_replicas_demand_adds_up_in_redis_and_a_failed_flush_is_kept(
    redis_url: str,  # noqa: F811
) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from gateway.state.demand import SharedDemand

    a_conn, b_conn = aioredis.from_url(redis_url), aioredis.from_url(redis_url)
    a, b = SharedDemand(a_conn, "t:"), SharedDemand(b_conn, "t:")
    a.add(KEY, 1000, 1, 100, 10)
    a.add(KEY, 1061, 2, 30, 3)  # the next hour's hash
    b.add(KEY, 1000, 1, 50, 5)
    await a.flush()
    await b.flush()
    got = await a.read(1000, 1062)
    assert got.series(KEY, 1000, 1001) == [Point(1000, 2, 150, 15)]
    assert got.series(KEY, 1061, 1062) == [Point(1061, 2, 30, 3)]
    await b_conn.aclose()
    b.redis = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.1)
    b.add(KEY, 1001, 1, 1, 1)
    with pytest.raises(RedisError):
        await b.flush()
    assert b.pending[KEY] == {1001: [1, 1, 1]}  # kept for the next flush
    b.redis = aioredis.from_url(redis_url)
    await b.flush()
    assert (await a.read(1001, 1002)).series(KEY, 1001, 1002) == [Point(1001, 1, 1, 1)]
    await b.redis.aclose()
    await a_conn.aclose()
