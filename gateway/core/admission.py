"""Admission: application-aware token buckets and FairServe's overload- and interaction-driven
throttling (OIT).

Every request is charged to its tenant's bucket and to its (tenant, application) bucket, in
tokens: prompt tokens plus expected output tokens, corrected with the real usage when it ends.
Charging never stops, but rejecting happens only while the model's engines are overloaded, and
never to a request that continues an interaction already in progress: an agent's fifth call is
not cut off after the first four have been paid for. A request that opens an interaction must
find room in the buckets for the whole interaction (its application's calls per interaction).

Hard limits (`limits` of a tenant or an application) are enforced always, overload or not,
continuing interaction or not: tokens per minute (a bucket charged like the soft ones),
requests per minute (a bucket charged one per request) and `max_concurrent` (requests under way,
a count that admission takes one of and the request's end gives back).

Buckets and interactions are pure here; `gateway.state.buckets` keeps them in one process or
in Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.config.schema import AppConfig, Config, LimitsConfig, TenantConfig
from gateway.core.fair_queue import Prices, Ticket
from gateway.core.request import RequestInfo

if TYPE_CHECKING:
    from gateway.core.dispatch import Dispatcher


Unit = Literal["tokens", "requests", "concurrent"]
TOKENS: Unit = "tokens"
REQUESTS: Unit = "requests"
CONCURRENT: Unit = "concurrent"


@dataclass(frozen=True, slots=True)
class Limit:
    """A bucket's shape: `per_minute` units refill it, it holds at most `burst`. A request is
    charged its tokens, or one request, or one slot (`concurrent`: no refill, the request's
    end gives the slot back). `hard` buckets refuse whenever they lack room; the others only
    under overload (OIT). `setting` names the config key, for the client's error."""

    per_minute: float
    burst: float
    unit: Unit = TOKENS
    hard: bool = False
    setting: str = ""

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


@dataclass(slots=True)
class Bucket:
    """Tokens available now; negative after charges beyond it (debt, paid back by refill)."""

    level: float
    stamp: float

    @classmethod
    def full(cls, limit: Limit, now: float) -> Bucket:
        return cls(limit.burst, now)

    def refill(self, limit: Limit, now: float) -> None:
        if now > self.stamp:
            self.level = min(limit.burst, self.level + (now - self.stamp) * limit.rate)
            self.stamp = now

    def charge(self, limit: Limit, tokens: float) -> None:
        # No floor: a request that ran far past its estimate is settled in full, and the
        # tenant waits out the debt; refunds cannot lift the bucket past its burst.
        self.level = min(limit.burst, self.level - tokens)

    def wait_for(self, limit: Limit, need: float) -> float:
        """Seconds until the bucket holds `need` tokens (inf: it never refills)."""
        short = need - self.level
        if short <= 0:
            return 0.0
        return short / limit.rate if limit.rate > 0 else float("inf")

    def reset_s(self, limit: Limit) -> float:
        return self.wait_for(limit, limit.burst)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The admission decision and what the `x-ratelimit-*` headers report."""

    admitted: bool
    retry_after_s: float = 0.0  # inf: only a request's end makes room (`concurrent`)
    limit: Limit | None = None  # the tightest token bucket
    remaining: float = 0.0
    reset_s: float = 0.0
    reason: str = ""  # the key of the bucket that refused
    refused: Limit | None = None  # and its shape
    requests: Limit | None = None  # the tightest requests bucket
    remaining_requests: float = 0.0
    reset_requests_s: float = 0.0


def plan(
    keys: Keyed, cost: float, need: float, enforce: bool
) -> tuple[list[float], list[float | None]]:
    """Per bucket, what admitting a request of `cost` tokens charges and what the bucket must
    hold first (None: not checked). Soft buckets check `need` only under `enforce`."""
    charges: list[float] = []
    needs: list[float | None] = []
    for _, lim in keys:
        if lim.unit == TOKENS:
            charges.append(cost)
            needs.append(min(cost if lim.hard else need, lim.burst)
                         if lim.hard or enforce else None)  # fmt: skip
        else:
            charges.append(1.0)
            needs.append(min(1.0, lim.burst) if lim.hard or enforce else None)
    return charges, needs


def amounts(keys: Keyed, tokens: float, requests: float = 0.0, slots: float = 0.0) -> list[float]:
    """Per bucket, the charge of `tokens`, `requests` and concurrency `slots` (negative: given
    back)."""
    by_unit = {TOKENS: tokens, REQUESTS: requests, CONCURRENT: slots}
    return [by_unit[lim.unit] for _, lim in keys]


def decide(
    buckets: list[tuple[str, Limit, Bucket]],
    cost: float,
    need: float,
    enforce: bool,
    now: float,
) -> Verdict:
    """Check and charge a request of `cost` tokens against every bucket at once (all or
    nothing).

    Hard buckets must hold the request's own charge (capped at their burst); with `enforce`,
    soft ones must hold `need` tokens (capped at their burst). Else the request is refused with
    the longest wait; without either the charge always goes through.
    """
    charges, needs = plan([(k, lim) for k, lim, _ in buckets], cost, need, enforce)
    return check_and_charge(buckets, charges, needs, now)


def check_and_charge(
    buckets: list[tuple[str, Limit, Bucket]],
    charges: Sequence[float],
    needs: Sequence[float | None],
    now: float,
) -> Verdict:
    """`decide` with its per-bucket charges and needs (`plan`, `amounts`) spelt out."""
    for _, limit, b in buckets:
        b.refill(limit, now)
    worst, refused = 0.0, -1
    for i, ((_, lim, b), want) in enumerate(zip(buckets, needs, strict=True)):
        if want is not None and (w := b.wait_for(lim, want)) > worst:
            worst, refused = w, i
    if refused >= 0:
        return summarize(buckets, False, worst, refused)
    for (_, limit, b), amount in zip(buckets, charges, strict=True):
        b.charge(limit, amount)
    return summarize(buckets, True, 0.0, -1)


def _tightest(
    buckets: list[tuple[str, Limit, Bucket]], unit: Unit
) -> tuple[Limit, float, float] | None:
    of_unit = [(lim, b) for _, lim, b in buckets if lim.unit == unit and lim.burst > 0]
    if not of_unit:
        return None
    lim, b = min(of_unit, key=lambda x: x[1].level / x[0].burst)
    return lim, max(0.0, b.level), b.reset_s(lim)


def summarize(
    buckets: list[tuple[str, Limit, Bucket]], admitted: bool, retry: float, refused: int
) -> Verdict:
    """The verdict on buckets as they now are; `refused` is the index of the one that refused
    (-1: none)."""
    reason, by = (buckets[refused][0], buckets[refused][1]) if refused >= 0 else ("", None)
    tokens, requests = _tightest(buckets, TOKENS), _tightest(buckets, REQUESTS)
    limit, remaining, reset = tokens or (None, 0.0, 0.0)
    rlimit, rremaining, rreset = requests or (None, 0.0, 0.0)
    return Verdict(admitted, retry, limit, remaining, reset, reason, by, rlimit, rremaining,
                   rreset)  # fmt: skip


@dataclass(slots=True)
class _Seen:
    first: float  # when this interaction opened
    last: float  # its latest admitted call
    calls: int  # admitted calls so far


class Interactions:
    """Interactions seen recently. An interaction is in progress while its calls keep coming
    within `ttl_s` of each other, for at most `lifetime_s` after it opened and at most
    `max_calls` calls (its application's `calls_per_interaction`): past either bound its next
    call counts as a new interaction, so an id cannot be used to dodge throttling forever.
    Bounded: the least recently seen are forgotten first."""

    def __init__(
        self, ttl_s: float = 300.0, max_size: int = 100_000, lifetime_s: float = 3600.0
    ) -> None:
        self.ttl_s = ttl_s
        self.lifetime_s = lifetime_s
        self.max_size = max_size
        self._seen: OrderedDict[tuple[str, str], _Seen] = OrderedDict()

    def in_progress(
        self, tenant: str, interaction: str | None, now: float, max_calls: int | None = None
    ) -> bool:
        """Whether a call of `interaction` now continues an interaction in progress."""
        if interaction is None:
            return False
        seen = self._seen.get((tenant, interaction))
        return seen is not None and self._continues(seen, now, max_calls)

    def _continues(self, seen: _Seen, now: float, max_calls: int | None) -> bool:
        return (
            now - seen.last <= self.ttl_s
            and now - seen.first <= self.lifetime_s
            and (max_calls is None or seen.calls < max_calls)
        )

    def touch(
        self, tenant: str, interaction: str | None, now: float, max_calls: int | None = None
    ) -> bool:
        """Record an admitted call; returns True when it continued an interaction in
        progress (else it opened a new one). Only admitted calls count: a refused first call
        opens nothing."""
        if interaction is None:
            return False
        key = (tenant, interaction)
        seen = self._seen.pop(key, None)
        continued = seen is not None and self._continues(seen, now, max_calls)
        if seen is not None and continued:
            seen.last, seen.calls = now, seen.calls + 1
        else:
            seen = _Seen(now, now, 1)
        self._seen[key] = seen
        while self._seen:
            oldest_key, oldest = next(iter(self._seen.items()))
            if now - oldest.last <= self.ttl_s and len(self._seen) <= self.max_size:
                break
            del self._seen[oldest_key]
        return continued

    def __len__(self) -> int:
        return len(self._seen)


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `20ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1:
        return f"{int(minutes)}m{int(secs)}s"
    return f"{secs:.3g}s"


def ratelimit_headers(v: Verdict) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers of the tightest token and requests buckets."""
    out: dict[str, str] = {}
    if v.limit is not None:
        out["x-ratelimit-limit-tokens"] = str(round(v.limit.per_minute))
        out["x-ratelimit-remaining-tokens"] = str(int(v.remaining))
        out["x-ratelimit-reset-tokens"] = format_reset(v.reset_s)
    if v.requests is not None:
        out["x-ratelimit-limit-requests"] = str(round(v.requests.per_minute))
        out["x-ratelimit-remaining-requests"] = str(int(v.remaining_requests))
        out["x-ratelimit-reset-requests"] = format_reset(v.reset_requests_s)
    return out


Keyed = Sequence[tuple[str, Limit]]


def bucket_keys(tenant: TenantConfig, app: AppConfig) -> Keyed:
    keys: list[tuple[str, Limit]] = []
    if tenant.tokens_per_minute > 0:
        keys.append((tenant.name, Limit(tenant.tokens_per_minute, tenant.burst_tokens)))
    if app.tokens_per_minute > 0:
        keys.append((f"{tenant.name}/{app.name}", Limit(app.tokens_per_minute, app.burst_tokens)))
    return keys


def limit_keys(tenant: TenantConfig, app: AppConfig) -> Keyed:
    """The hard limits of the tenant and of its application, as buckets."""
    keys: list[tuple[str, Limit]] = []
    where = f"tenants.{tenant.name}"
    for owner, lim, at in (
        (tenant.name, tenant.limits, f"{where}.limits"),
        (f"{tenant.name}/{app.name}", app.limits, f"{where}.apps.{app.name}.limits"),
    ):
        keys.extend(_hard(owner, lim, at))
    return keys


def _hard(owner: str, lim: LimitsConfig, at: str) -> Keyed:
    keys: list[tuple[str, Limit]] = []
    if lim.tokens_per_minute > 0:
        keys.append((f"{owner}#tokens", Limit(lim.tokens_per_minute, lim.burst_tokens, TOKENS,
                                              True, f"{at}.tokens_per_minute")))  # fmt: skip
    if lim.requests_per_minute > 0:
        rpm = Limit(lim.requests_per_minute, lim.burst_requests, REQUESTS, True,
                    f"{at}.requests_per_minute")  # fmt: skip
        keys.append((f"{owner}#requests", rpm))
    if lim.max_concurrent > 0:
        keys.append((f"{owner}#concurrent", Limit(0.0, float(lim.max_concurrent), CONCURRENT,
                                                  True, f"{at}.max_concurrent")))  # fmt: skip
    return keys


def expected_output(
    app: AppConfig, max_tokens: int | None, predicted: int | None = None, n: int = 1
) -> int:
    """Output tokens a request is expected to produce: the length predictor's median when the
    gateway has one, else its application's declared expectation, never above `max_tokens`;
    times the completions it asks for (`n`: max(n, best_of)), each about as long as one."""
    e = predicted if predicted is not None else app.expected_output_tokens
    return max(1, min(e, max_tokens or e)) * max(1, n)


def unit_cost(app: AppConfig, prices: Prices) -> float:
    return prices.input * app.expected_prompt_tokens + prices.output * app.expected_output_tokens


@dataclass(frozen=True, slots=True)
class Admitting:
    """What the buckets must decide for one request, and its ticket if they let it in."""

    keys: Keyed
    cost: float  # tokens charged now: prompt + expected output (of every completion asked)
    need: float  # tokens the buckets must hold under overload (a whole interaction's worth)
    enforce: bool  # overloaded and not continuing an interaction
    ticket: Ticket
    limits: Keyed = ()  # the hard limits, checked always


class Admission:
    """OIT's decision inputs for a request; the gateway and the simulator share it."""

    def __init__(self, cfg: Config, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.prices = Prices(cfg.fairness.input_price, cfg.fairness.output_price)
        f = cfg.fairness
        self.interactions = Interactions(f.interaction_ttl_s,
                                         lifetime_s=f.interaction_lifetime_s)  # fmt: skip
        # Per (tenant, app) of `_keys_cfg`: its buckets and hard limits, built once rather
        # than per request (a reload brings a new config, and the keys are built anew).
        self._keys: dict[tuple[str, str], tuple[Keyed, Keyed]] = {}
        self._keys_cfg = cfg

    def _keys_of(self, tenant: TenantConfig, app: AppConfig) -> tuple[Keyed, Keyed]:
        if self._keys_cfg is not self.cfg:
            self._keys.clear()
            self._keys_cfg = self.cfg
        found = self._keys.get((tenant.name, app.name))
        if found is None:
            found = (tuple(bucket_keys(tenant, app)), tuple(limit_keys(tenant, app)))
            self._keys[(tenant.name, app.name)] = found
        return found

    def prepare(self, info: RequestInfo, now: float) -> Admitting:
        tenant = self.cfg.tenants[info.tenant]
        app = tenant.apps[info.app]
        out = expected_output(app, info.max_tokens, info.predicted_output_tokens, info.n)
        cost = float(info.prompt_tokens + out)
        continuing = self.interactions.in_progress(info.tenant, info.interaction_id, now,
                                                   app.calls_per_interaction)  # fmt: skip
        opens = info.interaction_id is not None and not continuing
        need = cost * (app.calls_per_interaction if opens else 1)
        enforce = not continuing and self.dispatcher.overloaded(info.model)
        ticket = Ticket(
            info.id, info.tenant, info.app, info.prompt_tokens, out, now, tenant.weight,
            unit_cost(app, self.prices), continuing,
            predicted_output=info.predicted_output_tokens or 0,
        )  # fmt: skip
        keys, limits = self._keys_of(tenant, app)
        return Admitting(keys, cost, need, enforce, ticket, limits)

    def admitted(self, info: RequestInfo, now: float) -> None:
        """The request passed the buckets and has a place: its interaction is in progress."""
        # The config may have been reloaded since `prepare`: a tenant or app gone by now
        # leaves the call uncapped rather than failing it.
        tenant = self.cfg.tenants.get(info.tenant)
        app = tenant.apps.get(info.app) if tenant is not None else None
        calls = app.calls_per_interaction if app is not None else None
        self.interactions.touch(info.tenant, info.interaction_id, now, calls)
