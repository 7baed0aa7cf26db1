"""Fairness metrics as VTC (Sheng et al., OSDI'24) defines them, from per-request records.

Used by the locust report and by the simulator's evaluation alike; it needs only the records.

- Service of a request = prompt + 2 x output tokens, spread evenly over [first token, finish].
- Per-tenant service rate in windows (60 s by default): service received in the window / w.
- Demand rate: the service each tenant would have received had every request of it started
  the moment it arrived and run as long as it did (requests that were refused: as long as the
  mean served request). Spreading demand like service keeps requests that arrive at the end of
  a window from counting as withheld service there.
- Service difference in a window = max over tenants j of min(max_k s_k - s_j, d_j - s_j), on
  weighted rates (s / weight): how far the most short-changed tenant that still wanted more is
  from the best served one. Its maximum and average over windows are the headline figures.
- Accumulated difference = max_j W_j - min_j W_j over total weighted service of the tenants that
  were backlogged (demand above service) in most windows.
- Jain's index in a window over x_j = s_j / a_j, where a is the weighted max-min fair split of
  the service delivered in that window given the tenants' demands (water-filling): 1 when the
  window's service is split max-min fairly, lower when some tenant got less than its fair
  share while another got more. Averaged over windows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

INPUT_PRICE = 1.0
OUTPUT_PRICE = 2.0


@dataclass(frozen=True, slots=True)
class Record:
    tenant: str
    arrival: float
    first_token: float | None  # None: the request never produced a token
    finish: float | None
    prompt_tokens: int
    output_tokens: int
    weight: float = 1.0
    status: str = "ok"  # ok, or why it failed (throttled, queue_full, ...)

    @property
    def service(self) -> float:
        return INPUT_PRICE * self.prompt_tokens + OUTPUT_PRICE * self.output_tokens

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(frozen=True, slots=True)
class Fairness:
    windows: int
    max_diff: float  # service units per second
    avg_diff: float
    accumulated_diff: float  # service units
    jain: float
    rates: dict[str, list[float]]  # weighted service rate per window, per tenant
    window_s: float
    start: float


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def service_rates(
    records: Iterable[Record], start: float, end: float, window_s: float
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Weighted service and demand rates per tenant per window over [start, end)."""
    n = max(1, math.ceil((end - start) / window_s))
    served: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)
    demand: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)

    def spread(row: list[float], amount: float, t0: float, t1: float) -> None:
        t1 = max(t1, t0 + 1e-9)
        per_s = amount / (t1 - t0)
        lo, hi = max(0, int((t0 - start) // window_s)), min(n - 1, int((t1 - start) // window_s))
        for i in range(lo, hi + 1):
            w0 = start + i * window_s
            row[i] += per_s * _overlap(t0, t1, w0, w0 + window_s) / window_s

    records = list(records)
    runs = [
        r.finish - r.first_token
        for r in records
        if r.status == "ok" and r.first_token is not None and r.finish is not None
    ]
    typical = sum(runs) / len(runs) if runs else 1.0
    for r in records:
        ok = r.status == "ok" and r.first_token is not None and r.finish is not None
        length = r.finish - r.first_token if ok else typical  # type: ignore[operator]
        spread(demand[r.tenant], r.service / r.weight, r.arrival, r.arrival + length)
        if ok:
            spread(served[r.tenant], r.service / r.weight, r.first_token, r.finish)  # type: ignore[arg-type]
        else:
            served[r.tenant]  # every tenant gets a row, served or not
    return dict(served), dict(demand)


def max_min_shares(total: float, demands: dict[str, float]) -> dict[str, float]:
    """Water-filling: split `total` so that no tenant gets more than it asks for and the
    unsatisfied ones get equal amounts (weighted rates, so equal means weight-proportional)."""
    shares = dict.fromkeys(demands, 0.0)
    left, open_ = total, {t for t, d in demands.items() if d > 0}
    while open_ and left > 1e-9:
        even = left / len(open_)
        full = {t for t in open_ if demands[t] - shares[t] <= even}
        if not full:
            for t in open_:
                shares[t] += even
            break
        for t in full:
            left -= demands[t] - shares[t]
            shares[t] = demands[t]
        open_ -= full
    return shares


def jain(xs: Sequence[float]) -> float:
    if not xs or not any(xs):
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def fairness(
    records: Sequence[Record], start: float, end: float, window_s: float = 60.0
) -> Fairness:
    served, demand = service_rates(records, start, end, window_s)
    tenants = sorted(served)
    n = len(next(iter(served.values()))) if served else 0
    diffs: list[float] = []
    jains: list[float] = []
    backlogged_windows: dict[str, int] = defaultdict(int)
    for i in range(n):
        s = {t: served[t][i] for t in tenants}
        best = max(s.values(), default=0.0)
        diffs.append(max((min(best - s[t], demand[t][i] - s[t]) for t in tenants), default=0.0))
        # Backlogged: asked for more than it got (a little slack for windows' edges).
        for t in tenants:
            if demand[t][i] > 1.05 * s[t]:
                backlogged_windows[t] += 1
        # Demand as seen by the window: what arrived, plus what was served from earlier.
        want = {t: max(demand[t][i], s[t]) for t in tenants}
        fair = max_min_shares(sum(s.values()), want)
        xs = [s[t] / fair[t] for t in tenants if fair[t] > 0]
        if len(xs) >= 2:
            jains.append(jain(xs))
    totals = {t: sum(served[t]) * window_s for t in tenants}
    steady = [t for t in tenants if backlogged_windows[t] * 2 >= n] or tenants
    acc = max(totals[t] for t in steady) - min(totals[t] for t in steady) if steady else 0.0
    return Fairness(
        windows=n,
        max_diff=max((max(0.0, d) for d in diffs), default=0.0),
        avg_diff=sum(max(0.0, d) for d in diffs) / n if n else 0.0,
        accumulated_diff=acc,
        jain=sum(jains) / len(jains) if jains else 1.0,
        rates=served,
        window_s=window_s,
        start=start,
    )


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass(frozen=True, slots=True)
class TenantStats:
    requests: int
    ok: int
    throttled: int
    ttft_p50: float
    ttft_p99: float
    output_tokens_per_s: float
    service_per_s: float


def per_tenant(records: Iterable[Record], duration_s: float) -> dict[str, TenantStats]:
    by: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by[r.tenant].append(r)
    out: dict[str, TenantStats] = {}
    for tenant, rs in sorted(by.items()):
        ok = [r for r in rs if r.status == "ok" and r.finish is not None]
        ttfts = [t for r in ok if (t := r.ttft) is not None]
        out[tenant] = TenantStats(
            requests=len(rs),
            ok=len(ok),
            throttled=sum(r.status != "ok" for r in rs),
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            output_tokens_per_s=sum(r.output_tokens for r in ok) / duration_s,
            service_per_s=sum(r.service for r in ok) / duration_s,
        )
    return out
