"""`config.toml`, parsed once into frozen dataclasses and validated there.

Every problem is reported with the dotted key and the offending value
(`tenants.acme.weight must be > 0, got -1`); all of them are collected before start-up stops.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from engines.perf_model import GPUS, MODELS, PerfModel
from gateway.config.fairness import (
    AdminConfig,
    FairnessConfig,
    StateConfig,
    parse_admin,
    parse_fairness,
    parse_state,
)

EngineKind = Literal["sim", "vllm"]
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    backlog: int = 2048  # pending connections; 128 drops SYNs when hundreds connect at once
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0
    max_attempts: int = 3
    health_interval_s: float = 2.0
    health_timeout_s: float = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 1
    retry_after_s: int = 1


@dataclass(frozen=True, slots=True)
class AppConfig:
    """An application declares its shape: what a typical call costs, and how many calls one
    user interaction makes. Rates are in tokens (prompt + output) per minute; 0 = no limit."""

    name: str
    description: str = ""
    expected_prompt_tokens: int = 1000  # the Azure conversation trace: mean 1155, median 1020
    expected_output_tokens: int = 200  # ibid.: mean 211, median 129
    calls_per_interaction: int = 1
    tokens_per_minute: float = 0.0
    burst_tokens: float = 0.0


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    weight: float
    apps: Mapping[str, AppConfig]
    key_digests: Mapping[str, str]  # SHA-256 hex digest -> application name
    tokens_per_minute: float = 0.0  # 0 = no token bucket
    burst_tokens: float = 0.0  # defaults to one minute of tokens
    rpm: int = 0  # requests per minute under policy "rpm"; 0 = fairness.rpm_limit


@dataclass(frozen=True, slots=True)
class EngineConfig:
    id: str
    region: str
    model: str
    kind: EngineKind
    url: str = ""  # vllm: where it listens; sim: filled in when the engine starts
    api_key: str | None = None  # the engine's own upstream key, never the client's
    gpu: str = "H100"
    arch: str = ""
    tp: int = 1
    port: int = 0
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    max_running: int = 256  # the gateway's in-flight limit for this engine
    max_kv_tokens: int = 0  # in-flight prompt + expected output tokens; 0 = no limit


@dataclass(frozen=True, slots=True)
class SimConfig:
    time_scale: float = 1.0
    seed: int | None = None
    host: str = "127.0.0.1"


ROUTING_POLICIES = (
    "predicted-latency", "round-robin", "jsq", "least-tokens", "power-of-two", "least-outstanding",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    policy: str = "predicted-latency"
    region_threshold: float = 0.7  # leave the preferred region above this utilisation
    preferred_regions: tuple[str, ...] = ()  # for requests without an X-Fairway-Regions header
    model_path: str = ""  # the length model from `fairway train-router`; empty: running means
    reload_interval_s: float = 2.0  # how often the model file is checked for a new version
    feature_log_dir: str = ""  # empty: no feature log
    feature_log_max_bytes: int = 64 << 20
    feature_log_keep: int = 5


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    tenants: Mapping[str, TenantConfig]
    engines: tuple[EngineConfig, ...]
    sim: SimConfig
    log_level: str = "info"
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    state: StateConfig = field(default_factory=StateConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    @property
    def models(self) -> list[str]:
        return sorted({e.model for e in self.engines})


T = TypeVar("T")


class _Table:
    """Typed reads from one TOML table that record errors instead of raising."""

    def __init__(self, data: Mapping[str, Any], path: str, errors: list[str]) -> None:
        self.data = data
        self.path = path
        self.errors = errors
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        self.seen.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.errors.append(f"{self.key(name)} must be {names}, got {value!r}")
            return default
        return value  # type: ignore[return-value]

    def number(
        self, name: str, default: float, *, gt: float | None = None, ge: float | None = None
    ) -> float:
        value = float(self.get(name, (int, float), default))
        if gt is not None and not value > gt:
            self.errors.append(f"{self.key(name)} must be > {gt:g}, got {self.data[name]!r}")
            return default
        if ge is not None and not value >= ge:
            self.errors.append(f"{self.key(name)} must be >= {ge:g}, got {self.data[name]!r}")
            return default
        return value

    def integer(self, name: str, default: int, *, ge: int | None = None) -> int:
        value = self.get(name, int, default)
        if ge is not None and value < ge:
            self.errors.append(f"{self.key(name)} must be >= {ge}, got {value!r}")
            return default
        return value

    def table(self, name: str) -> _Table:
        return _Table(self.get(name, dict, {}), self.key(name), self.errors)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.seen:
                self.errors.append(f"{self.key(name)} is not a known setting")


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    cfg = ServerConfig(
        host=t.get("host", str, d.host),
        port=t.integer("port", d.port, ge=0),
        backlog=t.integer("backlog", d.backlog, ge=1),
        max_body_bytes=t.integer("max_body_bytes", d.max_body_bytes, ge=1024),
        body_timeout_s=t.number("body_timeout_s", d.body_timeout_s, gt=0),
        connect_timeout_s=t.number("connect_timeout_s", d.connect_timeout_s, gt=0),
        read_timeout_s=t.number("read_timeout_s", d.read_timeout_s, gt=0),
        max_attempts=t.integer("max_attempts", d.max_attempts, ge=1),
        health_interval_s=t.number("health_interval_s", d.health_interval_s, gt=0),
        health_timeout_s=t.number("health_timeout_s", d.health_timeout_s, gt=0),
        unhealthy_after=t.integer("unhealthy_after", d.unhealthy_after, ge=1),
        healthy_after=t.integer("healthy_after", d.healthy_after, ge=1),
        retry_after_s=t.integer("retry_after_s", d.retry_after_s, ge=1),
    )
    if cfg.port > 65535:
        t.errors.append(f"{t.key('port')} must be <= 65535, got {cfg.port}")
    t.finish()
    return cfg


def _routing(t: _Table) -> RoutingConfig:
    d = RoutingConfig()
    policy = t.get("policy", str, d.policy)
    if policy not in ROUTING_POLICIES:
        t.errors.append(
            f"{t.key('policy')} must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}"
        )
        policy = d.policy
    threshold = t.number("region_threshold", d.region_threshold, gt=0)
    if threshold > 1:
        t.errors.append(f"{t.key('region_threshold')} must be <= 1, got {threshold:g}")
    regions = t.get("preferred_regions", list, [])
    if not all(isinstance(r, str) for r in regions):
        t.errors.append(f"{t.key('preferred_regions')} must be a list of region names")
        regions = []
    cfg = RoutingConfig(
        policy=policy,
        region_threshold=threshold,
        preferred_regions=tuple(regions),
        model_path=t.get("model_path", str, d.model_path),
        reload_interval_s=t.number("reload_interval_s", d.reload_interval_s, gt=0),
        feature_log_dir=t.get("feature_log_dir", str, d.feature_log_dir),
        feature_log_max_bytes=t.integer("feature_log_max_bytes", d.feature_log_max_bytes, ge=1024),
        feature_log_keep=t.integer("feature_log_keep", d.feature_log_keep, ge=0),
    )
    t.finish()
    return cfg


def _tenant(name: str, t: _Table, digests_seen: dict[str, str]) -> TenantConfig:
    weight = t.number("weight", 1.0, gt=0)
    per_minute = t.number("tokens_per_minute", 0.0, ge=0)
    burst = t.number("burst_tokens", per_minute, ge=0) or per_minute
    rpm = t.integer("rpm", 0, ge=0)
    apps_t = t.table("apps")
    apps: dict[str, AppConfig] = {}
    for app_name in apps_t.data:
        apps[app_name] = _app(app_name, apps_t.table(app_name))
    apps_t.finish()
    if not apps:
        apps["default"] = AppConfig("default")
    digests: dict[str, str] = {}
    keys = t.get("keys", list, [])
    for i, entry in enumerate(keys):
        k = _Table(entry if isinstance(entry, dict) else {}, f"{t.key('keys')}[{i}]", t.errors)
        if not isinstance(entry, dict):
            t.errors.append(f"{k.path} must be a table with sha256 and app, got {entry!r}")
            continue
        digest = k.get("sha256", str, "").lower()
        app = k.get("app", str, next(iter(apps)))
        k.finish()
        if not _HEX64.match(digest):
            t.errors.append(f"{k.key('sha256')} must be 64 hex digits (a SHA-256 digest)")
            continue
        if app not in apps:
            t.errors.append(f"{k.key('app')} names an unknown application {app!r}")
        if digest in digests_seen:
            t.errors.append(f"{k.key('sha256')} is also a key of {digests_seen[digest]}")
        digests_seen[digest] = k.path
        digests[digest] = app
    t.finish()
    return TenantConfig(name, weight, apps, digests, per_minute, burst, rpm)


def _app(name: str, a: _Table) -> AppConfig:
    per_minute = a.number("tokens_per_minute", 0.0, ge=0)
    cfg = AppConfig(
        name,
        a.get("description", str, ""),
        a.integer("expected_prompt_tokens", 1000, ge=1),
        a.integer("expected_output_tokens", 200, ge=1),
        a.integer("calls_per_interaction", 1, ge=1),
        per_minute,
        a.number("burst_tokens", per_minute, ge=0) or per_minute,
    )
    a.finish()
    return cfg


def _engine(region: str, model: str, i: int, t: _Table) -> EngineConfig | None:
    kind: str = t.get("kind", str, "sim")
    default_id = f"{region}/{model}/{i}"
    eid = t.get("id", str, default_id)
    url = t.get("url", str, "").rstrip("/")
    api_key = t.get("api_key", str, "") or None
    key_env = t.get("api_key_env", str, "")
    if key_env:
        api_key = os.environ.get(key_env)
        if api_key is None:
            t.errors.append(f"{t.key('api_key_env')}: environment variable {key_env} is not set")
    gpu = t.get("gpu", str, "H100")
    arch = t.get("arch", str, model)
    tp = t.integer("tp", 1, ge=1)
    port = t.integer("port", 0, ge=0)
    max_num_seqs = t.integer("max_num_seqs", 256, ge=1)
    max_batched_tokens = t.integer("max_batched_tokens", 2048, ge=16)
    max_running = t.integer("max_running", max_num_seqs, ge=1)
    max_kv_tokens = t.integer("max_kv_tokens", -1, ge=-1)
    t.finish()
    if kind == "vllm":
        if not url.startswith(("http://", "https://")):
            t.errors.append(f"{t.key('url')} must be an http(s) URL for a vllm engine, got {url!r}")
        # Optional for vllm: given, they let the router price steps with the perf model.
        if "gpu" in t.data and gpu not in GPUS:
            t.errors.append(f"{t.key('gpu')} must be one of {sorted(GPUS)}, got {gpu!r}")
        if "arch" in t.data and arch not in MODELS:
            t.errors.append(f"{t.key('arch')} must be one of {sorted(MODELS)}, got {arch!r}")
    elif kind == "sim":
        if gpu not in GPUS:
            t.errors.append(f"{t.key('gpu')} must be one of {sorted(GPUS)}, got {gpu!r}")
        if arch not in MODELS:
            t.errors.append(
                f"{t.key('arch')} must be one of {sorted(MODELS)} for a sim engine, got {arch!r}"
            )
        elif max_kv_tokens < 0 and gpu in GPUS:
            max_kv_tokens = PerfModel.named(gpu, arch, tp).kv_capacity_tokens
    else:
        t.errors.append(f"{t.key('kind')} must be 'sim' or 'vllm', got {kind!r}")
        return None
    engine_kind: EngineKind = "sim" if kind == "sim" else "vllm"
    return EngineConfig(
        eid, region, model, engine_kind, url, api_key, gpu, arch, tp, port, max_num_seqs,
        max_batched_tokens, max_running, max(0, max_kv_tokens),
    )  # fmt: skip


def parse(data: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document; raises ConfigError listing every problem."""
    errors: list[str] = []
    root = _Table(data, "", errors)
    server = _server(root.table("server"))
    st = root.table("sim")
    seed = st.get("seed", int, -1)
    sim = SimConfig(
        time_scale=st.number("time_scale", 1.0, gt=0),
        seed=None if seed < 0 else seed,
        host=st.get("host", str, "127.0.0.1"),
    )
    st.finish()
    lt = root.table("logging")
    level = lt.get("level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        errors.append(f"logging.level must be debug, info, warning or error, got {level!r}")
    lt.finish()
    routing = _routing(root.table("routing"))

    tenants_t = root.table("tenants")
    digests_seen: dict[str, str] = {}
    tenants = {name: _tenant(name, tenants_t.table(name), digests_seen) for name in tenants_t.data}
    tenants_t.finish()
    if not tenants:
        errors.append("tenants: at least one tenant with a key is needed")

    engines: list[EngineConfig] = []
    regions = root.table("engines")
    for region in regions.data:
        models = regions.table(region)
        for model in models.data:
            entries = models.get(model, list, [])
            for i, entry in enumerate(entries):
                path = f"engines.{region}.{model}[{i}]"
                if not isinstance(entry, dict):
                    errors.append(f"{path} must be a table, got {entry!r}")
                    continue
                eng = _engine(region, model, i, _Table(entry, path, errors))
                if eng is not None:
                    engines.append(eng)
    regions.finish()
    if not engines:
        errors.append("engines: at least one engine is needed")
    ids = [e.id for e in engines]
    for eid in sorted({i for i in ids if ids.count(i) > 1}):
        errors.append(f"engines: id {eid!r} is used more than once")
    for name in (*tenants, *(e.model for e in engines)):
        if not _NAME.match(name):
            errors.append(f"{name!r} is not a valid name (letters, digits, . _ : / -)")
    fairness = parse_fairness(root.table("fairness"))
    admin = parse_admin(root.table("admin"), digests_seen)
    state = parse_state(root.table("state"))
    root.finish()
    if errors:
        raise ConfigError(errors)
    return Config(server, tenants, tuple(engines), sim, level, fairness, admin, state, routing)


def load(path: str | Path) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse(data)
