"""Fairness policies, token buckets, interactions and the dispatcher, with plain values."""

from __future__ import annotations

import itertools

import pytest

from gateway.core.admission import Bucket, Interactions, Limit, decide, format_reset
from gateway.core.dispatch import Decision, Dispatcher
from gateway.core.fair_queue import Prices, Ticket
from gateway.core.fairness import Fcfs, RpmLimit, Vtc, Wsc, make_policy
from gateway.core.ledger import EngineLimit, EngineSnapshot, Ledger

_handles = itertools.count(1)


def ticket(rid: str, tenant: str, prompt: int = 100, out: int = 100, **kw: object) -> Ticket:
    t = Ticket(rid, tenant, "app", prompt, out, 0.0, **kw)  # type: ignore[arg-type]
    t.handle = next(_handles)
    return t


def drain(policy: Vtc | Fcfs | RpmLimit, now: float = 0.0) -> list[str]:
    order = []
    while (t := policy.pop_next(now)) is not None:
        policy.charge_admission(t, now)
        policy.on_tokens(t, t.expected_output)
        order.append(t.rid)
    return order


def test_fcfs_is_arrival_order_across_tenants() -> None:
    p = Fcfs()
    for i, tenant in enumerate("abab"):
        p.enqueue(ticket(f"{tenant}{i}", tenant), 0.0)
    assert drain(p) == ["a0", "b1", "a2", "b3"]


def test_vtc_alternates_and_lifts_a_newly_backlogged_tenant() -> None:
    p = Vtc()
    for i in range(4):
        p.enqueue(ticket(f"a{i}", "a"), 0.0)
    first = p.pop_next(0.0)
    assert first is not None
    p.charge_admission(first, 0.0)
    p.on_tokens(first, 100)  # a has 300 units of service
    p.enqueue(ticket("b0", "b"), 0.0)
    assert p.counters()["b"] == 300  # lifted to the backlogged minimum, not 0
    p.enqueue(ticket("b1", "b"), 0.0)
    assert drain(p) == ["a1", "b0", "a2", "b1", "a3"]


def test_vtc_weights_share_service_in_proportion() -> None:
    p = Vtc()
    for i in range(30):
        p.enqueue(ticket(f"a{i}", "a", weight=2.0), 0.0)
        p.enqueue(ticket(f"b{i}", "b", weight=1.0), 0.0)
    first = drain(p)[:30]
    assert sum(r.startswith("a") for r in first) == 20


def test_vtc_settles_the_prompt_with_real_usage() -> None:
    p = Vtc(Prices(1.0, 2.0))
    t = ticket("a", "a", prompt=100)
    p.charge_admission(t, 0.0)
    p.on_finish(t, 130, 0)
    assert p.counters()["a"] == 130


def test_wsc_normalises_by_application_and_serves_continuations_first() -> None:
    p = Wsc()
    # Tenant a's application is ten times as expensive per call as b's: one call each costs
    # one unit, so they alternate although a's calls are ten times larger.
    for i in range(3):
        p.enqueue(ticket(f"a{i}", "a", prompt=1000, out=1000, unit_cost=3000.0), 0.0)
        p.enqueue(ticket(f"b{i}", "b", prompt=100, out=100, unit_cost=300.0), 0.0)
    p.enqueue(ticket("c-cont", "c", continuing=True), 0.0)
    order = drain(p)
    assert order[0] == "c-cont"
    assert order[1:] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert p.counters()["a"] == pytest.approx(3.0)
    assert p.counters()["b"] == pytest.approx(3.0)


def test_rpm_caps_starts_per_minute_and_says_when_to_wake() -> None:
    p = RpmLimit(lambda tenant: 2)
    for i in range(3):
        p.enqueue(ticket(f"a{i}", "a"), 0.0)
    assert drain(p, now=10.0) == ["a0", "a1"]
    assert p.pop_next(20.0) is None
    assert p.wake_at(20.0) == 70.0
    assert drain(p, now=70.0) == ["a2"]


def test_remove_and_enqueue_front_keep_the_queue_consistent() -> None:
    p = make_policy("wsc", Prices(), lambda t: 1)
    a, b = ticket("a", "x"), ticket("b", "x")
    p.enqueue(a, 0.0)
    p.enqueue(b, 0.0)
    assert p.remove(a) and not p.remove(a)
    t = p.pop_next(0.0)
    assert t is b and p.waiting() == 0
    p.enqueue_front(b)
    assert p.waiting() == 1 and p.backlog("x") == 1
    with pytest.raises(ValueError, match="unknown fairness policy"):
        make_policy("lottery", Prices(), lambda t: 1)


def test_bucket_refills_caps_and_reports_the_wait() -> None:
    lim = Limit(per_minute=600, burst=100)  # 10 tokens a second
    b = Bucket.full(lim, 0.0)
    ok = decide([("t", lim, b)], cost=80, need=80, enforce=True, now=0.0)
    assert ok.admitted and ok.remaining == 20
    no = decide([("t", lim, b)], cost=80, need=80, enforce=True, now=1.0)  # 30 now
    assert not no.admitted and no.retry_after_s == pytest.approx(5.0)
    # Not enforced (no overload): charged anyway, into debt, in full.
    assert decide([("t", lim, b)], cost=500, need=500, enforce=False, now=1.0).admitted
    assert b.level == -470
    b.refill(lim, 1000.0)
    assert b.level == 100
    assert format_reset(0.25) == "250ms" and format_reset(360) == "6m0s"


def test_both_buckets_or_neither() -> None:
    wide, narrow = Limit(6000, 1000), Limit(600, 50)
    bw, bn = Bucket.full(wide, 0.0), Bucket(10.0, 0.0)
    v = decide([("t", wide, bw), ("t/a", narrow, bn)], 80, 80, True, 0.0)
    assert not v.admitted and bw.level == 1000  # the app bucket refused: nothing charged
    assert v.limit == narrow  # headers report the tighter bucket


def test_interactions_are_in_progress_within_their_ttl() -> None:
    seen = Interactions(ttl_s=10.0, max_size=2)
    assert not seen.touch("t", "i1", 0.0)
    assert seen.touch("t", "i1", 5.0)
    assert not seen.touch("u", "i1", 5.0)  # another tenant's id is another interaction
    assert not seen.touch("t", "i1", 30.0)  # expired
    assert not seen.touch("t", None, 30.0)
    seen.touch("t", "i2", 31.0)
    seen.touch("t", "i3", 31.0)
    assert len(seen) == 2


def test_an_interaction_ends_after_its_calls_or_its_lifetime() -> None:
    seen = Interactions(ttl_s=10.0, lifetime_s=25.0)
    assert not seen.touch("t", "i", 0.0, max_calls=3)  # opens
    assert seen.in_progress("t", "i", 1.0, max_calls=3)
    assert seen.touch("t", "i", 1.0, max_calls=3)
    assert seen.touch("t", "i", 2.0, max_calls=3)  # the third call of three
    assert not seen.in_progress("t", "i", 3.0, max_calls=3)  # a fourth counts as new
    assert not seen.touch("t", "i", 3.0, max_calls=3)  # and opens the next interaction
    # Calls within the ttl each, but the lifetime (25 s from the opening at 3) runs out.
    assert [seen.touch("t", "i", t) for t in (9.0, 15.0, 21.0, 27.0, 30.0)] == [
        True, True, True, True, False]  # fmt: skip
    assert seen.in_progress("t", "i", 31.0)  # the call at 30 opened the next one


def test_debt_beyond_one_burst_is_settled_in_full() -> None:
    lim = Limit(per_minute=60.0, burst=100.0)  # one token a second
    b = Bucket.full(lim, 0.0)
    b.charge(lim, 450.0)  # a request that ran far past its estimate
    assert b.level == -350.0  # not forgiven at -burst
    b.refill(lim, 300.0)
    assert b.level == -50.0
    assert b.wait_for(lim, 10.0) == 60.0
    b.charge(lim, -1000.0)  # a refund cannot lift it past the burst
    assert b.level == 100.0


def _dispatcher(policy: str = "vtc", running: int = 1, tokens: int = 0) -> Dispatcher:
    snaps = [EngineSnapshot(id=e, region="r", model="m") for e in ("e0", "e1")]
    ledger = Ledger()
    for e in ("e0", "e1"):
        ledger.add_engine(e, EngineLimit(max_running=running, max_tokens=tokens))
    return Dispatcher(
        lambda model: make_policy(policy, Prices(), lambda t: 100),
        ledger,
        lambda model: snaps if model == "m" else [],
        lambda t, engines: engines[0].id,
        max_queue_per_tenant=2,
    )


def test_dispatcher_queues_only_when_every_engine_is_saturated() -> None:
    d = _dispatcher()
    a0, a1, a2, a3, b0 = (ticket(r, r[0]) for r in ("a0", "a1", "a2", "a3", "b0"))
    assert d.submit(a0, "m", 0.0) == (Decision.START, "e0")
    assert not d.overloaded("m")
    assert d.submit(a1, "m", 0.0) == (Decision.START, "e1")
    assert d.overloaded("m")
    assert d.submit(a2, "m", 0.0)[0] is Decision.QUEUED
    assert d.submit(a3, "m", 0.0)[0] is Decision.QUEUED
    assert d.submit(ticket("a4", "a"), "m", 0.0)[0] is Decision.FULL
    assert d.submit(b0, "m", 0.0)[0] is Decision.QUEUED
    assert d.submit(ticket("z", "z"), "other", 0.0)[0] is Decision.UNAVAILABLE
    # b was lifted to a's counter; a2 is older, so a2 then b0.
    assert d.finish(a0, "m", 100, 100, 1.0) == [(a2, "e0")]
    assert d.finish(a1, "m", 100, 100, 1.0) == [(b0, "e1")]
    assert d.cancel(a3, "m") and d.policy("m").waiting() == 0


def test_dispatcher_counts_tokens_against_kv_limits() -> None:
    d = _dispatcher(running=10, tokens=500)
    big = ticket("big", "a", prompt=2000, out=100)
    assert d.submit(big, "m", 0.0)[0] is Decision.START  # an idle engine takes anything
    assert d.submit(ticket("s1", "a", prompt=300), "m", 0.0) == (Decision.START, "e1")
    assert d.submit(ticket("s2", "a", prompt=300), "m", 0.0)[0] is Decision.QUEUED
    assert d.ledger.loads["e1"].kv_tokens == 400
    assert d.ledger.loads["e0"].kv_tokens == 2100


def test_wsc_lifts_only_newly_active_tenants() -> None:
    for policy, expected in ((Vtc(), 300.0), (Wsc(), 1.0)):
        flood = [ticket(f"a{i}", "a", unit_cost=300.0) for i in range(3)]
        for t in flood:
            policy.enqueue(t, 0.0)
        first = policy.pop_next(0.0)
        assert first is not None
        policy.charge_admission(first, 0.0)
        policy.on_tokens(first, 100)  # a: 300 service = 1 WSC unit
        steady = ticket("b0", "b", unit_cost=300.0)
        policy.charge_admission(steady, 0.0)  # b has a request running, started without waiting
        policy.enqueue(ticket("b1", "b", unit_cost=300.0), 0.0)
        # VTC lifts b level with the flood; WSC keeps b's own, lower, counter: b goes first.
        lifted = policy.counters()["b"]
        assert (lifted >= expected) if policy.name == "vtc" else (lifted < expected)
        assert (policy.pop_next(0.0).rid == "b1") == (policy.name == "wsc")  # type: ignore[union-attr]


def test_wsc_continuations_cannot_ride_past_their_share() -> None:
    p = Wsc()
    for i in range(3):
        p.enqueue(ticket(f"a{i}", "a", unit_cost=300.0), 0.0)
    p.served["b"] = 5.0  # b is five typical requests ahead of a
    p.enqueue(ticket("b-cont", "b", unit_cost=300.0, continuing=True), 0.0)
    assert p.pop_next(0.0).rid == "a0"  # type: ignore[union-attr]
    p.served["b"] = 0.5
    assert p.pop_next(0.0).rid == "b-cont"  # type: ignore[union-attr]


def test_expected_output_prefers_the_prediction_and_respects_max_tokens() -> None:
    from gateway.config.schema import AppConfig
    from gateway.core.admission import expected_output

    app = AppConfig("chat", expected_output_tokens=200)
    assert expected_output(app, None) == 200
    assert expected_output(app, None, predicted=37) == 37
    assert expected_output(app, 20, predicted=37) == 20
    assert expected_output(app, 500) == 200
