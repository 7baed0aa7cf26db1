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

from gateway.config.batch import BatchConfig
from gateway.config.engines import EngineConfig, Engines, check_engines, engine_configs
from gateway.config.fairness import FairnessConfig, StateConfig
from gateway.config.fields import (
    TABLE,
    ConfigError,
    Count,
    Name,
    Natural,
    Positive,
    dotted,
    format_error,
    lower,
    one_of,
    report,
)
from gateway.config.planner import PlannerConfig
from gateway.config.tenants import (
    AppConfig,
    KeyEntry,
    LimitsConfig,
    TenantConfig,
    TenantTable,
    check_tenants,
    tenant_configs,
    tenant_keys,
)
from gateway.routing.policies import POLICY_NAMES as ROUTING_POLICIES
from gateway.routing.policies import PREDICTED_LATENCY

__all__ = [
    "AdminConfig", "AppConfig", "BatchConfig", "Config", "ConfigError", "EngineConfig",
    "EngineDiff", "FairnessConfig", "LimitsConfig", "LoggingConfig", "RoutingConfig",
    "ServerConfig", "SimConfig", "StateConfig", "TenantConfig", "diff_engines", "load", "parse",
]  # fmt: skip


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
class AdminConfig:
    """`[admin]`: the keys that may call /admin, by their SHA-256 digests."""

    keys: tuple[KeyEntry, ...] = ()

    @property
    def key_digests(self) -> frozenset[str]:
        return frozenset(k.sha256 for k in self.keys)


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
    tenants: Annotated[dict[Name, TenantTable], AfterValidator(check_tenants)] = Field(
        default_factory=dict, validate_default=True
    )
    engines: Annotated[Engines, AfterValidator(check_engines)] = Field(
        default_factory=dict, validate_default=True
    )

    @model_validator(mode="after")
    def _admin_keys_are_no_tenant_keys(self) -> Self:
        # Checked here, once both tables are valid: it is the one check that spans two tables.
        keys = tenant_keys(self.tenants)
        report([
            (("admin", "keys", i, "sha256"), a.sha256,
             f"is also a key of {dotted(keys[a.sha256][0])}")
            for i, a in enumerate(self.admin.keys) if a.sha256 in keys
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
        tenants=tenant_configs(doc.tenants),
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
