"""`config.toml`, validated once into frozen values: `load(path)`, `parse(document)`.

Every table is a pydantic dataclass that refuses unknown keys and values of the wrong type
(gateway.config.fields). Each problem names its dotted key and the offending value
(`tenants.acme.weight must be > 0, got -1`), and all of them come in one ConfigError. Checks
that relate entries to each other (a key's application, a digest or an engine id used twice)
run on the tables whose own values are valid.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import KW_ONLY, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Self

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

from gateway.config.batch import DAY_S, BatchConfig
from gateway.config.engines import EngineConfig, Engines, check_engines, engine_configs
from gateway.config.fairness import FairnessConfig, StateConfig
from gateway.config.fields import (
    TABLE,
    ConfigError,
    Count,
    Digest,
    Loc,
    Name,
    Natural,
    Positive,
    Rate,
    dotted,
    format_error,
    lower,
    one_of,
    report,
)
from gateway.config.planner import PlannerConfig
from gateway.routing.policies import POLICY_NAMES as ROUTING_POLICIES
from gateway.routing.policies import PREDICTED_LATENCY

__all__ = [
    "AdminConfig", "AppConfig", "BatchConfig", "Config", "ConfigError", "EngineConfig",
    "EngineDiff", "FairnessConfig", "LimitsConfig", "LoggingConfig", "RoutingConfig",
    "ServerConfig", "SimConfig", "StateConfig", "TenantConfig", "diff_engines", "load", "parse",
]  # fmt: skip


# `interactive` wants its answer now; `batch` tolerates delay (gateway.core.demand.CLASSES).
DemandClass = Literal["interactive", "batch"]


# --- Tables read as they are.


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class ServerConfig:
    """`[server]`: where the gateway listens, and its limits towards clients and engines."""

    host: StrictStr = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 8080
    backlog: Count = 2048  # pending connections; 128 drops SYNs when hundreds connect at once
    max_body_bytes: Annotated[StrictInt, Field(ge=1024)] = 4 * 1024 * 1024
    body_timeout_s: Positive = 30.0
    connect_timeout_s: Positive = 2.0
    read_timeout_s: Positive = 300.0
    max_attempts: Count = 3
    # Consecutive 5xx answers that eject an engine (open its breaker); probes re-admit it
    # half-open, where its first 5xx ejects it again.
    http_5xx_eject_after: Count = 5
    health_interval_s: Positive = 2.0
    health_timeout_s: Positive = 1.0
    unhealthy_after: Count = 2
    healthy_after: Count = 1
    retry_after_s: Count = 1
    # How long a draining engine's requests may run on before they are ended.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 60.0
    # After SIGTERM, how long requests under way may run on before they are ended.
    shutdown_timeout_s: Annotated[float, Field(ge=0)] = 30.0
    # A stream whose client reads nothing for this long (the gateway's buffer for it full) is
    # cut, so that it does not hold its engine slot.
    send_timeout_s: Positive = 30.0
    # SO_SNDBUF of a streaming client's socket (0: the kernel's autotuning): bounds the kernel
    # memory a client that reads slowly can hold, and how much it may fall behind.
    send_buffer_bytes: Annotated[StrictInt, Field(ge=0)] = 0
    # From a request head's first byte to its last; past it, 408 and the connection closes.
    head_timeout_s: Positive = 15.0
    # Once listening, freeze start-up objects out of the cyclic garbage collector and collect
    # young objects less often (gateway.http.serve); off: Python's defaults.
    tune_gc: StrictBool = True


def _random_if_negative(seed: int | None) -> int | None:
    # TOML has no null: a negative seed, like none at all, asks for a random run.
    return None if seed is None or seed < 0 else seed


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class SimConfig:
    """`[sim]`: the simulated engines' clock and output lengths."""

    time_scale: Positive = 1.0
    seed: Annotated[StrictInt | None, AfterValidator(_random_if_negative)] = None
    host: StrictStr = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class LoggingConfig:
    """`[logging]`."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(lower)] = "info"


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class RoutingConfig:
    """`[routing]`: the policy that picks an engine, and the output-length model it reads."""

    policy: Annotated[StrictStr, one_of(ROUTING_POLICIES)] = PREDICTED_LATENCY
    region_threshold: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.7  # leave a region above it
    preferred_regions: tuple[StrictStr, ...] = ()  # for requests without X-Fairway-Regions
    model_path: StrictStr = ""  # the length model from `fairway train-router`; "": running means
    reload_interval_s: Positive = 2.0  # how often the model file is checked for a new version
    feature_log_dir: StrictStr = ""  # "": no feature log
    feature_log_max_bytes: Annotated[StrictInt, Field(ge=1024)] = 64 << 20
    feature_log_keep: Natural = 5


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class KeyEntry:
    """An entry of a `keys` list: the SHA-256 digest of an API key, never the key itself."""

    sha256: Digest


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class AdminConfig:
    """`[admin]`: the keys that may call /admin, by their SHA-256 digests."""

    keys: tuple[KeyEntry, ...] = ()

    @property
    def key_digests(self) -> frozenset[str]:
        return frozenset(k.sha256 for k in self.keys)


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
class _TenantTable:
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


def _tenant_keys(tenants: dict[str, _TenantTable]) -> dict[str, list[Loc]]:
    """Each digest with every key that has it, in file order."""
    keys: dict[str, list[Loc]] = {}
    for name, t in tenants.items():
        for i, k in enumerate(t.keys):
            keys.setdefault(k.sha256, []).append(("tenants", name, "keys", i))
    return keys


def _check_tenants(tenants: dict[str, _TenantTable]) -> dict[str, _TenantTable]:
    if not tenants:
        raise ValueError(": at least one tenant with a key is needed")
    # A digest names one principal: shared, one tenant could stand for another.
    report([
        ((*again[1:], "sha256"), digest, f"is also a key of {dotted(first)}")
        for digest, (first, *others) in _tenant_keys(tenants).items() for again in others
    ])  # fmt: skip
    return tenants


# --- The document.


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class _Document:
    """`config.toml` as written."""

    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    routing: RoutingConfig = RoutingConfig()
    sim: SimConfig = SimConfig()
    fairness: FairnessConfig = FairnessConfig()
    batch: BatchConfig = BatchConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    planner: PlannerConfig = PlannerConfig()
    tenants: Annotated[dict[Name, _TenantTable], AfterValidator(_check_tenants)] = Field(
        default_factory=dict, validate_default=True
    )
    engines: Annotated[Engines, AfterValidator(check_engines)] = Field(
        default_factory=dict, validate_default=True
    )

    @model_validator(mode="after")
    def _admin_keys_are_no_tenant_keys(self) -> Self:
        # Checked here, once both tables are valid: it is the one check that spans two tables.
        tenant_keys = _tenant_keys(self.tenants)
        report([
            (("admin", "keys", i, "sha256"), a.sha256,
             f"is also a key of {dotted(tenant_keys[a.sha256][0])}")
            for i, a in enumerate(self.admin.keys) if a.sha256 in tenant_keys
        ])  # fmt: skip
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class Config:
    """A whole `config.toml`, validated, with tenants and engines in their resolved form."""

    server: ServerConfig
    tenants: Mapping[str, TenantConfig]
    engines: tuple[EngineConfig, ...]
    sim: SimConfig = SimConfig()
    logging: LoggingConfig = LoggingConfig()
    fairness: FairnessConfig = FairnessConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    routing: RoutingConfig = RoutingConfig()
    batch: BatchConfig = BatchConfig()
    planner: PlannerConfig = PlannerConfig()  # off unless [planner] enabled = true

    @property
    def log_level(self) -> str:
        return self.logging.level

    @property
    def models(self) -> list[str]:
        return sorted({e.model for e in self.engines})


def _app(name: str, a: _AppTable, t: _TenantTable) -> AppConfig:
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


def _tenant(name: str, t: _TenantTable) -> TenantConfig:
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


_DOCUMENT = TypeAdapter(_Document)


def parse(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    try:
        doc = _DOCUMENT.validate_python(data)
    except ValidationError as exc:
        # In the order of the file's tables, whatever order pydantic found them in.
        rank: dict[str | int, int] = {}
        if isinstance(data, Mapping):  # a document that is not a table has one error anyway
            rank = {key: i for i, key in enumerate(data)}
        errors = sorted(
            exc.errors(), key=lambda e: rank.get(e["loc"][0], len(rank)) if e["loc"] else -1
        )
        raise ConfigError([format_error(e) for e in errors]) from None
    return Config(
        server=doc.server, sim=doc.sim, logging=doc.logging, fairness=doc.fairness,
        admin=doc.admin, state=doc.state, routing=doc.routing, batch=doc.batch,
        planner=doc.planner,
        tenants={name: _tenant(name, t) for name, t in doc.tenants.items()},
        engines=engine_configs(doc.engines),
    )  # fmt: skip


def load(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse(data)


class EngineDiff(NamedTuple):
    """Engines by id: in the new config only, in the old only, and in both with other settings
    (`changed` holds their new settings)."""

    added: list[EngineConfig]
    removed: list[EngineConfig]
    changed: list[EngineConfig]


def diff_engines(old: Config, new: Config) -> EngineDiff:
    """What a reload from `old` to `new` changes in the fleet, keyed by engine id; each list in
    the order of the config it comes from."""
    before = {e.id: e for e in old.engines}
    after = {e.id: e for e in new.engines}
    return EngineDiff(
        added=[e for e in new.engines if e.id not in before],
        removed=[e for e in old.engines if e.id not in after],
        changed=[e for e in new.engines if e.id in before and before[e.id] != e],
    )
