"""Admission: application-aware token buckets and FairServe's overload- and interaction-driven
throttling (OIT).

Every request is charged to its tenant's bucket and to its (tenant, application) bucket, in
tokens: prompt tokens plus expected output tokens, corrected with the real usage when it ends.
Charging never stops, but rejecting happens only while the model's engines are overloaded, and
never to a request that continues an interaction already in progress: an agent's fifth call is
not cut off after the first four have been paid for. A request that opens an interaction must
find room in the buckets for the whole interaction (its application's calls per interaction).

Buckets and interactions are pure here; `gateway.state.buckets` keeps them in one process or
in Redis.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config.schema import AppConfig, Config, TenantConfig
from gateway.core.fairness import Prices, Ticket
from gateway.core.request import RequestInfo

if TYPE_CHECKING:
    from gateway.core.dispatch import Dispatcher


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket's shape: `per_minute` tokens refill it, it holds at most `burst`."""

    per_minute: float
    burst: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


@dataclass(slots=True)
class Bucket:
    """Tokens available now; negative after charges beyond it (debt of at most one burst)."""

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
        self.level = max(-limit.burst, min(limit.burst, self.level - tokens))

    def wait_for(self, limit: Limit, need: float) -> float:
        """Seconds until the bucket holds `need` tokens."""
        return max(0.0, need - self.level) / limit.rate if limit.rate > 0 else float("inf")

    def reset_s(self, limit: Limit) -> float:
        return self.wait_for(limit, limit.burst)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The admission decision and what the `x-ratelimit-*` headers report."""

    admitted: bool
    retry_after_s: float = 0.0
    limit: Limit | None = None  # the tighter of the buckets checked
    remaining: float = 0.0
    reset_s: float = 0.0
    reason: str = ""


def decide(
    buckets: list[tuple[str, Limit, Bucket]],
    cost: float,
    need: float,
    enforce: bool,
    now: float,
) -> Verdict:
    """Check and charge `cost` tokens against every bucket at once (all or nothing).

    With `enforce`, each bucket must hold `need` tokens (capped at its burst) or the request is
    refused with the longest wait; without it the charge always goes through.
    """
    for _, limit, b in buckets:
        b.refill(limit, now)
    if enforce:
        waits = [(b.wait_for(lim, min(need, lim.burst)), name) for name, lim, b in buckets]
        worst = max(waits, default=(0.0, ""))
        if worst[0] > 0:
            return _verdict(buckets, False, worst[0], worst[1])
    for _, limit, b in buckets:
        b.charge(limit, cost)
    return _verdict(buckets, True, 0.0, "")


def _verdict(
    buckets: list[tuple[str, Limit, Bucket]], admitted: bool, retry: float, reason: str
) -> Verdict:
    if not buckets:
        return Verdict(admitted, retry, reason=reason)
    _, limit, b = min(buckets, key=lambda x: x[2].level / x[1].burst)
    return Verdict(admitted, retry, limit, max(0.0, b.level), b.reset_s(limit), reason)


class Interactions:
    """Interactions seen recently: an interaction is in progress while its calls keep coming
    within `ttl_s` of each other. Bounded: the oldest are forgotten first."""

    def __init__(self, ttl_s: float = 300.0, max_size: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_size = max_size
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def in_progress(self, tenant: str, interaction: str | None, now: float) -> bool:
        """Whether a call of `interaction` now continues an interaction in progress."""
        if interaction is None:
            return False
        last = self._seen.get((tenant, interaction))
        return last is not None and now - last <= self.ttl_s

    def touch(self, tenant: str, interaction: str | None, now: float) -> bool:
        """Record an admitted call; returns True when it continued an interaction in
        progress. Only admitted calls count: a refused first call opens nothing."""
        if interaction is None:
            return False
        key = (tenant, interaction)
        last = self._seen.pop(key, None)
        self._seen[key] = now
        while self._seen:
            oldest_key, oldest = next(iter(self._seen.items()))
            if now - oldest <= self.ttl_s and len(self._seen) <= self.max_size:
                break
            del self._seen[oldest_key]
        return last is not None and now - last <= self.ttl_s

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
    if v.limit is None:
        return {}
    return {
        "x-ratelimit-limit-tokens": str(round(v.limit.per_minute)),
        "x-ratelimit-remaining-tokens": str(int(v.remaining)),
        "x-ratelimit-reset-tokens": format_reset(v.reset_s),
    }


Keyed = Sequence[tuple[str, Limit]]


def bucket_keys(tenant: TenantConfig, app: AppConfig) -> Keyed:
    keys: list[tuple[str, Limit]] = []
    if tenant.tokens_per_minute > 0:
        keys.append((tenant.name, Limit(tenant.tokens_per_minute, tenant.burst_tokens)))
    if app.tokens_per_minute > 0:
        keys.append((f"{tenant.name}/{app.name}", Limit(app.tokens_per_minute, app.burst_tokens)))
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


class Admission:
    """OIT's decision inputs for a request; the gateway and the simulator share it."""

    def __init__(self, cfg: Config, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.dispatcher = dispatcher
        self.prices = Prices(cfg.fairness.input_price, cfg.fairness.output_price)
        self.interactions = Interactions(cfg.fairness.interaction_ttl_s)

    def prepare(self, info: RequestInfo, now: float) -> Admitting:
        tenant = self.cfg.tenants[info.tenant]
        app = tenant.apps[info.app]
        out = expected_output(app, info.max_tokens, info.predicted_output_tokens, info.n)
        cost = float(info.prompt_tokens + out)
        continuing = self.interactions.in_progress(info.tenant, info.interaction_id, now)
        opens = info.interaction_id is not None and not continuing
        need = cost * (app.calls_per_interaction if opens else 1)
        enforce = not continuing and self.dispatcher.overloaded(info.model)
        ticket = Ticket(
            info.id, info.tenant, info.app, info.prompt_tokens, out, now, tenant.weight,
            unit_cost(app, self.prices), continuing,
            predicted_output=info.predicted_output_tokens or 0,
        )  # fmt: skip
        return Admitting(bucket_keys(tenant, app), cost, need, enforce, ticket)

    def admitted(self, info: RequestInfo, now: float) -> None:
        """The request passed the buckets and has a place: its interaction is in progress."""
        self.interactions.touch(info.tenant, info.interaction_id, now)
