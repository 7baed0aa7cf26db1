"""The fairness, admin and shared-state tables of `config.toml` (see gateway.config)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from gateway.core.fairness import POLICY_NAMES

if TYPE_CHECKING:
    from gateway.config.schema import _Table

StateBackend = Literal["memory", "redis"]


@dataclass(frozen=True, slots=True)
class FairnessConfig:
    policy: str = "wsc"  # fcfs | rpm | vtc | wsc
    input_price: float = 1.0  # service units per prompt token (VTC's prices)
    output_price: float = 2.0  # per output token
    max_queue_per_tenant: int = 1024  # 429 beyond this many waiting requests
    queue_timeout_s: float = 60.0  # 503 after waiting this long
    rpm_limit: int = 600  # policy "rpm": requests a tenant may start per minute
    interaction_ttl_s: float = 300.0  # an interaction is in progress while calls come this often
    overload_at: float = 0.6  # OIT throttles from this share of the engines' in-flight limits


@dataclass(frozen=True, slots=True)
class AdminConfig:
    key_digests: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: StateBackend = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "fairway:"


def parse_fairness(t: _Table) -> FairnessConfig:
    d = FairnessConfig()
    cfg = FairnessConfig(
        policy=t.get("policy", str, d.policy),
        input_price=t.number("input_price", d.input_price, gt=0),
        output_price=t.number("output_price", d.output_price, gt=0),
        max_queue_per_tenant=t.integer("max_queue_per_tenant", d.max_queue_per_tenant, ge=1),
        queue_timeout_s=t.number("queue_timeout_s", d.queue_timeout_s, gt=0),
        rpm_limit=t.integer("rpm_limit", d.rpm_limit, ge=1),
        interaction_ttl_s=t.number("interaction_ttl_s", d.interaction_ttl_s, gt=0),
        overload_at=t.number("overload_at", d.overload_at, gt=0),
    )
    if cfg.overload_at > 1:
        t.errors.append(f"{t.key('overload_at')} must be <= 1, got {cfg.overload_at:g}")
    if cfg.policy not in POLICY_NAMES:
        t.errors.append(
            f"{t.key('policy')} must be one of {list(POLICY_NAMES)}, got {cfg.policy!r}"
        )
    t.finish()
    return cfg


def parse_admin(t: _Table, digests_seen: Mapping[str, str]) -> AdminConfig:
    digests: set[str] = set()
    for i, entry in enumerate(t.get("keys", list, [])):
        path = f"{t.key('keys')}[{i}]"
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or len(entry) != 1 or not _is_hex64(digest.lower()):
            t.errors.append(f"{path} must be a table {{ sha256 = <64 hex digits> }}, got {entry!r}")
            continue
        if digest.lower() in digests_seen:
            t.errors.append(f"{path}.sha256 is also a key of {digests_seen[digest.lower()]}")
        digests.add(digest.lower())
    t.finish()
    return AdminConfig(frozenset(digests))


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def parse_state(t: _Table) -> StateConfig:
    d = StateConfig()
    backend = t.get("backend", str, d.backend)
    url = t.get("redis_url", str, d.redis_url)
    prefix = t.get("prefix", str, d.prefix)
    t.finish()
    if backend not in ("memory", "redis"):
        t.errors.append(f"{t.key('backend')} must be 'memory' or 'redis', got {backend!r}")
        backend = "memory"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        t.errors.append(f"{t.key('redis_url')} must be a redis:// URL, got {url!r}")
    return StateConfig("redis" if backend == "redis" else "memory", url, prefix)
