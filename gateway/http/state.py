"""What one gateway process holds, under the aiohttp application's typed key."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config.schema import Config
from gateway.fleet.manager import FleetManager
from gateway.fleet.registry import EngineRegistry
from gateway.http.auth import KeyRing
from gateway.http.gate import Gate
from gateway.lengths.service import LengthService
from gateway.obs.metrics import GatewayMetrics
from gateway.state.demand import SharedDemand
from gateway.upstream.proxy import Proxy


def request_ids() -> Iterator[str]:
    """A random per-process prefix and a counter: unique across gateway replicas without a
    random draw per request."""
    prefix = os.urandom(6).hex()
    return (f"{prefix}-{n:x}" for n in itertools.count(1))


@dataclass(slots=True)
class Gateway:
    """Everything one gateway process holds. `cfg` and `keys` are replaced whole by a config
    reload; everything else lives as long as the process."""

    cfg: Config
    keys: KeyRing
    metrics: GatewayMetrics
    registry: EngineRegistry
    proxy: Proxy
    probes: aiohttp.ClientSession  # health checks and load scraping
    gate: Gate
    fleet: FleetManager
    ids: Iterator[str] = field(default_factory=request_ids)
    lengths: LengthService | None = None  # output-length prediction and the feature log
    config_path: Path | None = None  # what SIGHUP and POST /admin/reload re-read
    raw: dict[str, Any] = field(default_factory=dict)  # the TOML document `cfg` came from
    stopping: bool = False  # SIGTERM: readiness is 503 and new requests are refused
    shared_demand: SharedDemand | None = None  # every replica's demand (Redis state)


GATEWAY = web.AppKey("gateway", Gateway)
