"""The `[tenants]` table of `config.toml`: each tenant's weight, applications, keys, buckets and
hard limits as written, and resolved into one `TenantConfig` each, every value an application
leaves unset taken from its tenant's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, fields, replace
from typing import Annotated, Literal, Self

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass

from gateway.config.batch import DAY_S
from gateway.config.fields import TABLE, Count, Digest, Loc, Natural, Positive, Rate, dotted, report

# `interactive` wants its answer now; `batch` tolerates delay (gateway.core.demand.CLASSES).
DemandClass = Literal["interactive", "batch"]


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class KeyEntry:
    """An entry of a `keys` list: the SHA-256 digest of an API key, never the key itself."""

    sha256: Digest


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class LimitsConfig:
    """`limits` of a tenant or an application: hard limits, enforced always (not only under
    overload) and, with the Redis backend, shared by every replica. 0 = no limit."""

    tokens_per_minute: Rate = 0.0  # prompt + output tokens, settled with the real usage
    burst_tokens: Rate = 0.0  # defaults to one minute of tokens
    requests_per_minute: Rate = 0.0
    burst_requests: Rate = 0.0  # defaults to one minute of requests
    max_concurrent: Natural = 0  # requests under way at once (queued or in flight)


def _limits(lim: LimitsConfig) -> LimitsConfig:
    return replace(lim, burst_tokens=lim.burst_tokens or lim.tokens_per_minute,
                   burst_requests=lim.burst_requests or lim.requests_per_minute)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class _AppTable:
    """`[tenants.<tenant>.apps.<app>]`: what a typical call costs, and how many calls one user
    interaction makes. Rates are in tokens (prompt + output) per minute; 0 = no limit."""

    description: StrictStr = ""
    expected_prompt_tokens: Count = 1000  # the Azure conversation trace: mean 1155, median 1020
    expected_output_tokens: Count = 200  # ibid.: mean 211, median 129
    calls_per_interaction: Count = 1
    tokens_per_minute: Rate = 0.0
    burst_tokens: Rate = 0.0  # defaults to one minute of tokens
    limits: LimitsConfig = LimitsConfig()
    # The demand its requests count in (the planner's): default the tenant's.
    demand_class: DemandClass | None = None
    # Batch requests: their deadline without X-Fairway-Deadline, the longest that header may
    # ask for, and whether a batch application may send X-Fairway-Class: interactive. Default
    # the tenant's.
    batch_deadline_s: Positive | None = None
    batch_max_deadline_s: Positive | None = None
    allow_interactive: StrictBool | None = None


@dataclass(frozen=True, slots=True, config=TABLE)
class AppConfig(_AppTable):
    """An application of a tenant: its table and its name (the only positional field)."""

    name: str


# --- Tenants: their tables as written, and the values derived from them.


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class _TenantKey(KeyEntry):
    """An entry of `tenants.<tenant>.keys`."""

    app: StrictStr | None = None  # default: the tenant's first application


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class TenantTable:
    """`[tenants.<tenant>]` as written."""

    weight: Positive = 1.0
    tokens_per_minute: Rate = 0.0  # 0 = no token bucket
    burst_tokens: Rate = 0.0  # defaults to one minute of tokens
    rpm: Natural = 0  # requests per minute under policy "rpm"; 0 = fairness.rpm_limit
    max_n: Count = 8  # the most completions one request may ask for: max(n, best_of)
    max_top_logprobs: Annotated[StrictInt, Field(ge=0, le=1000)] = 20  # (top_/prompt_)logprobs
    cache_salt: StrictBool = True  # the gateway salts the engines' prefix cache per tenant
    max_concurrent: Natural = 256  # requests under way at once (queued + in flight); 0 = no limit
    max_body_bytes_in_flight: Natural = 64 << 20  # bytes of their request bodies; 0 = no limit
    limits: LimitsConfig = LimitsConfig()  # hard limits of the whole tenant
    demand_class: DemandClass = "interactive"  # or "batch": delay-tolerant (the planner's)
    # A batch request's deadline without X-Fairway-Deadline (default 24 h, at most the cap),
    # and the cap: the longest X-Fairway-Deadline may ask for (default 24 h).
    batch_deadline_s: Positive | None = None
    batch_max_deadline_s: Positive | None = None
    allow_interactive: StrictBool = False  # a batch application may claim interactive
    apps: dict[str, _AppTable] = Field(default_factory=dict)
    keys: tuple[_TenantKey, ...] = ()

    @model_validator(mode="after")
    def _deadlines_within_their_caps(self) -> Self:
        # A deadline set beside a shorter cap is a mistake; one inherited is cut to the cap.
        cap = self.batch_max_deadline_s or DAY_S
        tables: list[tuple[Loc, float | None, float]] = [
            ((), self.batch_deadline_s, cap),
            *((("apps", name), a.batch_deadline_s, a.batch_max_deadline_s or cap)
              for name, a in self.apps.items()),
        ]  # fmt: skip
        report([
            ((*loc, "batch_deadline_s"), deadline, f"must be <= batch_max_deadline_s ({most:g})")
            for loc, deadline, most in tables if deadline is not None and deadline > most
        ])  # fmt: skip
        return self

    @model_validator(mode="after")
    def _keys_name_its_apps(self) -> Self:
        apps = set(self.apps) or {"default"}
        report([
            (("keys", i, "app"), k.app, f"names an unknown application {k.app!r}")
            for i, k in enumerate(self.keys) if k.app is not None and k.app not in apps
        ])  # fmt: skip
        return self


@dataclass(frozen=True, slots=True, config=TABLE)
class TenantConfig:
    """A tenant: its weight (its share under contention), applications, keys and buckets."""

    name: str
    weight: float
    apps: Mapping[str, AppConfig]
    key_digests: Mapping[str, str]  # SHA-256 hex digest -> application name
    _: KW_ONLY
    tokens_per_minute: float = 0.0  # 0 = no token bucket
    burst_tokens: float = 0.0
    rpm: int = 0  # requests per minute under policy "rpm"; 0 = fairness.rpm_limit
    max_n: int = 8  # the most completions one request may ask for: max(n, best_of)
    max_top_logprobs: int = 20  # the most `top_logprobs`, `logprobs` or `prompt_logprobs`
    cache_salt: bool = True  # the gateway salts the engines' prefix cache per tenant
    max_concurrent: int = 256  # requests under way at once (queued + in flight); 0 = no limit
    max_body_bytes_in_flight: int = 64 << 20  # bytes of their request bodies; 0 = no limit
    limits: LimitsConfig = LimitsConfig()  # hard limits, their bursts resolved
    demand_class: str = "interactive"
    batch_deadline_s: float = DAY_S
    batch_max_deadline_s: float = DAY_S
    allow_interactive: bool = False


def tenant_keys(tenants: dict[str, TenantTable]) -> dict[str, list[Loc]]:
    """Each digest with every key that has it, in file order."""
    keys: dict[str, list[Loc]] = {}
    for name, t in tenants.items():
        for i, k in enumerate(t.keys):
            keys.setdefault(k.sha256, []).append(("tenants", name, "keys", i))
    return keys


def check_tenants(tenants: dict[str, TenantTable]) -> dict[str, TenantTable]:
    if not tenants:
        raise ValueError(": at least one tenant with a key is needed")
    # A digest names one principal: shared, one tenant could stand for another.
    report([
        ((*again[1:], "sha256"), digest, f"is also a key of {dotted(first)}")
        for digest, (first, *others) in tenant_keys(tenants).items() for again in others
    ])  # fmt: skip
    return tenants


def _app(name: str, a: _AppTable, t: TenantTable) -> AppConfig:
    """An application's table with what it leaves unset taken from its tenant's."""
    table = {f.name: getattr(a, f.name) for f in fields(a)}
    cap = a.batch_max_deadline_s or t.batch_max_deadline_s or DAY_S
    deadline = min(a.batch_deadline_s or t.batch_deadline_s or DAY_S, cap)
    return AppConfig(name, **{**table, "burst_tokens": a.burst_tokens or a.tokens_per_minute,
                              "limits": _limits(a.limits),
                              "demand_class": a.demand_class or t.demand_class,
                              "batch_deadline_s": deadline, "batch_max_deadline_s": cap,
                              "allow_interactive": t.allow_interactive
                              if a.allow_interactive is None else a.allow_interactive})  # fmt: skip


def _tenant(name: str, t: TenantTable) -> TenantConfig:
    apps = {app: _app(app, a, t) for app, a in t.apps.items()} or {
        "default": _app("default", _AppTable(), t)
    }
    first = next(iter(apps))
    digests = {k.sha256: first if k.app is None else k.app for k in t.keys}
    cap = t.batch_max_deadline_s or DAY_S
    return TenantConfig(name, t.weight, apps, digests, tokens_per_minute=t.tokens_per_minute,
                        burst_tokens=t.burst_tokens or t.tokens_per_minute, rpm=t.rpm,
                        max_n=t.max_n, max_top_logprobs=t.max_top_logprobs,
                        cache_salt=t.cache_salt, max_concurrent=t.max_concurrent,
                        max_body_bytes_in_flight=t.max_body_bytes_in_flight,
                        limits=_limits(t.limits), demand_class=t.demand_class,
                        batch_deadline_s=min(t.batch_deadline_s or DAY_S, cap),
                        batch_max_deadline_s=cap,
                        allow_interactive=t.allow_interactive)  # fmt: skip


def tenant_configs(tenants: Mapping[str, TenantTable]) -> dict[str, TenantConfig]:
    """Every tenant in its resolved form, in the order of the file."""
    return {name: _tenant(name, t) for name, t in tenants.items()}
