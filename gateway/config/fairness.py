"""The `[fairness]` and `[state]` tables of `config.toml`: who goes next while a model's
engines are saturated, and where the token buckets live."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictFloat, StrictStr
from pydantic.dataclasses import dataclass

from gateway.config.fields import TABLE, Count, Positive, one_of
from gateway.core.fairness import POLICY_NAMES

StateBackend = Literal["memory", "redis"]


def _redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must be a redis:// URL, got {url!r}")
    return url


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class FairnessConfig:
    """`[fairness]`: the policy, its prices and the bounds of the gateway's queues."""

    policy: Annotated[StrictStr, one_of(POLICY_NAMES)] = "wsc"  # fcfs | rpm | vtc | wsc
    input_price: Positive = 1.0  # service units per prompt token (VTC's prices)
    output_price: Positive = 2.0  # per output token
    max_queue_per_tenant: Count = 1024  # 429 beyond this many waiting requests
    queue_timeout_s: Positive = 60.0  # 503 after waiting this long
    rpm_limit: Count = 600  # policy "rpm": requests a tenant may start per minute
    interaction_ttl_s: Positive = 300.0  # in progress while its calls come this often
    interaction_lifetime_s: Positive = 3600.0  # and for at most this long after it opened
    # OIT throttles from this share of the engines' in-flight limits.
    overload_at: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.6


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class StateConfig:
    """`[state]`: token buckets and fairness in this process, or in Redis to share them
    between replicas."""

    backend: StateBackend = "memory"
    redis_url: Annotated[StrictStr, AfterValidator(_redis_url)] = "redis://127.0.0.1:6379/0"
    prefix: StrictStr = "fairway:"
    # Each Redis call may take this long; after `open_after` failures in a row the gateway
    # stops asking Redis and serves on local buckets, probing Redis every `probe_interval_s`.
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.25
    open_after: Count = 3
    probe_interval_s: Positive = 1.0
    # Replicas share fairness counters, waiting tenants and in-flight load this often.
    sync_interval_s: Annotated[StrictFloat, Field(gt=0, le=5)] = 0.1
