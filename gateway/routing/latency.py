"""Predicted-latency routing: the engine where this request costs the fleet least.

For each healthy engine of the model the policy prices, from the engine's snapshot and its
performance model, two things (after the Intelligent Router, arXiv 2408.13510):

- this request's own end-to-end latency there: the prefill queued ahead of it, its own prefill
  (chunked, sharing steps with the streams decoding there), a wait for a sequence slot or KV
  room when the engine is full, and its predicted output times the decode step time with it
  in the batch, stretched by the share of the engine's time that the prefill recently sent
  there takes (chunked prefill rides in the same steps);
- the delay it adds to the requests already running there: its prefill makes their steps
  compute bound for a while (prefill-heavy mixing), and its decode makes every step longer by
  the KV it reads, for as long as it decodes (decode-heavy mixing).

It picks the least sum. Before that, region preference (SageServe's short-term rule): stay in
the first preferred region whose utilisation is under a threshold, else take the least used.

Everything is O(1) per engine from the closed form of the roofline, so a decision over 16
engines costs tens of microseconds (benchmarks/routing_bench.py measures it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engines.perf_model import PerfModel
from gateway.core.ledger import EngineSnapshot, recent_rate
from gateway.core.request import RequestInfo
from gateway.routing.policies import BASELINES, POLICY_NAMES, PREDICTED_LATENCY, RoutingPolicy

# A request the predictor knows nothing about: the median output of the Azure conversation
# trace (docs/ENGINE.md).
DEFAULT_OUTPUT_TOKENS = 151
# Cap on the prefill share of an engine's time read from that rate: it is an estimate, and a
# decode slowed by 1 / (1 - share) must not swamp every other term when a burst inflates it.
MAX_PREFILL_SHARE = 0.5
# Relative difference in cost below which two engines count as equally good.
TIE = 0.01
# z of the 0.9 quantile of a normal: turns (median, p90) of a log-normal into its sigma.
_Z90 = 1.2816


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """An engine's performance model reduced to the constants the cost formulas need."""

    compute_per_token: float  # s per new token, GEMMs (compute roof)
    compute_per_pair: float  # s per (new token, attended position), attention
    weights_s: float  # s to stream the weights once (memory roof)
    kv_per_token: float  # s to read or write one token's KV
    overhead_s: float
    max_num_seqs: int
    max_batched_tokens: int
    kv_capacity: int

    @classmethod
    def of(
        cls, perf: PerfModel, max_num_seqs: int = 256, max_batched_tokens: int = 2048
    ) -> EngineProfile:
        m, tp = perf.model, perf.tp
        flops = perf.gpu.peak_flops * perf.eff.compute * tp
        bw = perf.gpu.hbm_bandwidth * perf.eff.bandwidth * tp
        return cls(
            compute_per_token=2.0 * m.params / flops,
            compute_per_pair=4.0 * m.layers * m.heads * m.head_dim / flops,
            weights_s=m.weight_bytes / bw,
            kv_per_token=m.kv_bytes_per_token / bw,
            overhead_s=perf.eff.step_overhead_s,
            max_num_seqs=max_num_seqs,
            max_batched_tokens=max_batched_tokens,
            kv_capacity=perf.kv_capacity_tokens,
        )

    def constants(self) -> tuple[float, float, float, float, float, int, int, int]:
        """The fields as one tuple: unpacked once per engine per decision, it is cheaper."""
        return (self.compute_per_token, self.compute_per_pair, self.weights_s,
                self.kv_per_token, self.overhead_s, self.max_num_seqs,
                self.max_batched_tokens, self.kv_capacity)  # fmt: skip

    @classmethod
    def named(
        cls,
        gpu: str = "H100",
        arch: str = "llama-3.1-8b",
        tp: int = 1,
        max_num_seqs: int = 256,
        max_batched_tokens: int = 2048,
    ) -> EngineProfile:
        return cls.of(PerfModel.named(gpu, arch, tp), max_num_seqs, max_batched_tokens)


def others(e: EngineSnapshot) -> int:
    """Requests at `e` that the gateway did not send: the scraped running + waiting less the
    gateway's own in flight there at the scrape. Those of its own that ended since the scrape
    are in both, so they drop out; the ones it sent since are in neither."""
    n = e.running + e.waiting - e.in_flight_at_scrape
    return n if n > 0 else 0


def engine_load(e: EngineSnapshot) -> int:
    """Requests at `e` now, as far as the gateway can tell: its own in flight (exact) and
    others' as of the last scrape."""
    return e.in_flight + others(e)


def region_utilisation(engines: Sequence[EngineSnapshot], profiles: Mapping[str, EngineProfile],
                       default: EngineProfile) -> float:  # fmt: skip
    """Mean over the engines of the larger of KV use and sequence slots in use (the
    gateway's requests there now and others' from the gauges: `engine_load`)."""
    total = 0.0
    for e in engines:
        slots = profiles.get(e.id, default).max_num_seqs
        total += max(e.kv_usage, engine_load(e) / slots)
    return total / len(engines) if engines else 1.0


def prefer_regions(
    request: RequestInfo,
    engines: Sequence[EngineSnapshot],
    threshold: float,
    profiles: Mapping[str, EngineProfile],
    default: EngineProfile,
) -> Sequence[EngineSnapshot]:
    """SageServe's short-term rule: the engines of the first preferred region whose
    utilisation is under `threshold`; when all are over it, the least utilised region."""
    if not request.preferred_regions:
        return engines
    by_region: dict[str, list[EngineSnapshot]] = {}
    for e in engines:
        by_region.setdefault(e.region, []).append(e)
    util = {r: region_utilisation(es, profiles, default) for r, es in by_region.items()}
    for region in request.preferred_regions:
        if region in util and util[region] < threshold:
            return by_region[region]
    return by_region[min(util, key=util.__getitem__)]


class PredictedLatency:
    """Least (own latency + delay added to the engine's running requests), region-aware.

    `prefill_weight` and `decode_weight` scale the delay imposed on others (by this request's
    prefill, and by its decode) against its own latency. 1.0 would price every second alike;
    the defaults are lower because that estimate is pessimistic (a chunk of prefill partly
    fills steps that decode alone would leave memory bound, and a stream that is slowed down
    is not always one that would have waited). They were chosen in the simulator on a part
    of the trace that the evaluation in docs/ROUTING.md does not use.
    """

    name = "predicted-latency"

    def __init__(
        self,
        profiles: Mapping[str, EngineProfile] | None = None,
        *,
        default: EngineProfile | None = None,
        region_threshold: float = 0.7,
        prefill_weight: float = 0.5,
        decode_weight: float = 0.5,
    ) -> None:
        self.profiles = dict(profiles or {})
        self.default = default or EngineProfile.named()
        self.region_threshold = region_threshold
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self._turn = 0
        self._consts: dict[str, tuple[float, float, float, float, float, int, int, int]] = {}

    def set_profile(self, engine: str, profile: EngineProfile | None) -> None:
        """An engine joined (or changed) with this performance profile; None: it left."""
        if profile is None:
            self.profiles.pop(engine, None)
        else:
            self.profiles[engine] = profile
        self._consts.pop(engine, None)

    def choose(self, request: RequestInfo, engines: Sequence[EngineSnapshot]) -> str:
        if request.preferred_regions:
            engines = prefer_regions(
                request, engines, self.region_threshold, self.profiles, self.default
            )
        p, now = request.prompt_tokens, request.arrival
        o: float = request.predicted_output_tokens or DEFAULT_OUTPUT_TOKENS
        upper = request.predicted_output_upper
        if upper is not None and upper > o:
            # The mean of a log-normal with this median and 0.9 quantile: latency is paid in
            # expectation, and the median underestimates a long tail.
            sigma = math.log(upper / o) / _Z90
            o = o * math.exp(0.5 * sigma * sigma)
        # Start the scan one engine further each time: equal engines (idle ones) share load.
        self._turn += 1
        k = self._turn % len(engines)
        order = (*engines[k:], *engines[:k])
        costs = self.costs(order, p, o, now)
        # Costs within TIE of the least are equal to within what the model can tell: the
        # first in rotated order takes it, so near-idle engines share load instead of one
        # of them winning every time on a rounding-size difference.
        good_enough = min(costs) * (1.0 + TIE)
        for e, cost in zip(order, costs, strict=True):
            if cost <= good_enough:
                return e.id
        return order[0].id

    def cost(self, e: EngineSnapshot, p: int, o: float, now: float = 0.0) -> float:
        """Seconds: the request's own latency at `e` plus the weighted delay it adds to the
        streams running there. `o` is its expected output length in tokens, `now` the time of
        the decision on the clock of `EngineSnapshot.recent_prompt_at`."""
        return self.costs((e,), p, o, now)[0]

    def costs(self, engines: Sequence[EngineSnapshot], p: int, o: float, now: float) -> list[float]:
        """`cost` of each engine. One loop with everything in locals: this is the hot path
        (16 engines in tens of microseconds)."""
        consts, wp, wd = self._consts, self.prefill_weight, self.decode_weight
        half_pp = 0.5 * p * p
        out: list[float] = []
        for e in engines:
            c = consts.get(e.id)
            if c is None:
                c = consts[e.id] = self.profiles.get(e.id, self.default).constants()
            ct, cp, mw, mk, oh, slots, budget, kv_cap = c
            mine, prompt, decode, waiting = (e.in_flight, e.in_flight_prompt_tokens,
                                             e.in_flight_decode_tokens, e.waiting)  # fmt: skip
            # The gateway's own requests from the ledger (exact now), others' from the gauges:
            # the scraped count less what the gateway had there at the scrape, so that its
            # requests that ended since then do not count as load.
            foreign = e.running + waiting - e.in_flight_at_scrape
            if foreign < 0:
                foreign = 0
            n = mine + foreign
            if waiting > n:
                waiting = n  # the gauge is older than the ledger: no more wait than are there
            r = n if n < slots else slots
            per_req = decode / mine if mine else o
            prompt_mean = prompt / mine if mine else p
            # KV held now: every prompt, and on average half of every expected output.
            ctx = prompt + 0.5 * decode
            if foreign:  # others' requests, seen only in the scraped gauges
                ctx += foreign * (prompt_mean + 0.5 * per_req)
            # Decode step without and with this request in the batch (compute vs memory roof).
            if r:
                c0, m0 = ct * r + cp * ctx, mw + mk * (ctx + r)
                t0 = (c0 if c0 > m0 else m0) + oh
            else:
                t0 = 0.0
            c1, m1 = ct * (r + 1) + cp * (ctx + p), mw + mk * (ctx + p + r + 1)
            t1 = (c1 if c1 > m1 else m1) + oh
            # Own prefill in chunks that share each step's token budget with r decodes.
            room = budget - r
            chunks = -(-p // (room if room > 64 else 64))
            cf = ct * (p + r * chunks) + cp * (half_pp + ctx * chunks)
            mf = chunks * (mw + mk * (ctx + p + r))
            t_prefill = (cf if cf > mf else mf) + chunks * oh
            # Prefill queued ahead: requests beyond the slots, or those reported waiting.
            queued = n - r
            if waiting > queued:
                queued = waiting
            wait = ct * queued * prompt_mean
            if n >= slots or ctx + p + o > kv_cap:
                stay = per_req * (t0 or t1)  # slots and KV free up as running streams finish
                if n >= slots:
                    wait += (n + 1 - slots) / slots * stay
                if ctx + p + o > kv_cap:
                    wait += (ctx + p + o - kv_cap) / kv_cap * stay
            # Prefill sent there lately takes this share of the engine's time; chunked prefill
            # rides in the decode steps, so each of them lasts 1 / (1 - share) longer.
            share = 0.0
            if e.recent_prompt_rate:
                share = ct * recent_rate(e.recent_prompt_rate, e.recent_prompt_at, now)
                if share > MAX_PREFILL_SHARE:
                    share = MAX_PREFILL_SHARE
            own = wait + t_prefill + o * t1 / (1.0 - share)
            # Delay added to the r running streams: the prefill's extra step time, then a
            # longer step for each of this request's o decode steps. Streams that finish
            # meanwhile are replaced by new arrivals: the batch it slows lasts as long as it.
            extra = t_prefill - chunks * t0
            out.append(own + r * ((wp * extra if extra > 0.0 else 0.0) + wd * (t1 - t0) * o))
        return out


def build_policy(
    name: str,
    profiles: Mapping[str, EngineProfile] | None = None,
    region_threshold: float = 0.7,
) -> RoutingPolicy:
    """The policy named in `[routing] policy` (one of `POLICY_NAMES`); `profiles` are the
    engines' perf models. KeyError for a name that is not registered."""
    if name == PREDICTED_LATENCY:
        return PredictedLatency(profiles, region_threshold=region_threshold)
    factory = BASELINES.get(name)
    if factory is None:
        raise KeyError(f"unknown routing policy {name!r}; known: {', '.join(POLICY_NAMES)}")
    return factory()
