"""Config reload (SIGHUP, `POST /admin/reload`): re-read the file and apply it as a diff.

Tenants, keys, weights, rates, applications, queue bounds and engines apply to the running
gateway; tenants' service counters and token buckets are kept (they are keyed by name). An
engine that is gone from the file drains; a new one joins; one whose limits changed takes the
new limits; one whose address or model changed drains and joins again. Settings that shape
long-lived objects (listen address, timeouts, the state backend, the fairness and routing
policies and prices, the simulator's clock) need a restart: a reload that changes them applies
the rest and says which were left. An invalid file changes nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from gateway.config import diff_engines
from gateway.config.schema import Config, ConfigError, EngineConfig, parse
from gateway.http.auth import KeyRing
from gateway.http.state import Gateway

log = structlog.get_logger("fairway.reload")

# (section, attribute or None for the whole section) that a reload cannot change.
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("server", None), ("state", None), ("sim", None), ("logging", None), ("routing", None),
    ("fairness", "policy"), ("fairness", "input_price"), ("fairness", "output_price"),
)  # fmt: skip
_LIMITS = frozenset({"max_running", "max_kv_tokens"})


@dataclass(slots=True)
class ReloadResult:
    ok: bool
    errors: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        if not self.ok:
            return {"status": "error", "errors": self.errors}
        engines = {"added": self.added, "removed": self.removed, "changed": self.changed}
        return {"status": "ok", "errors": self.errors, "engines": engines,
                "restart_required": self.restart_required}  # fmt: skip


def _restart_required(old: Config, new: Config) -> list[str]:
    out = []
    for section, attr in RESTART_ONLY:
        a, b = getattr(old, section), getattr(new, section)
        if attr is not None:
            a, b = getattr(a, attr), getattr(b, attr)
        if a != b:
            out.append(section if attr is None else f"{section}.{attr}")
    return out


def _only_limits(old: EngineConfig, new: EngineConfig) -> bool:
    """Whether `new` differs from `old` in the gateway's own limits alone."""
    return replace(old, **{k: getattr(new, k) for k in _LIMITS}) == new


async def reload_config(gw: Gateway) -> ReloadResult:
    """Re-read `gw.config_path` and apply it; never raises for a bad file."""
    metrics = gw.metrics.config_reloads
    if gw.config_path is None:
        metrics.labels("error").inc()
        return ReloadResult(False, ["the gateway was not started from a config file"])
    try:
        with gw.config_path.open("rb") as f:
            raw = tomllib.load(f)
        new = parse(raw)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        return _failed(gw, [f"{gw.config_path}: {exc}"])
    except ConfigError as exc:
        return _failed(gw, list(exc.errors))
    old = gw.cfg
    result = ReloadResult(True, restart_required=_restart_required(old, new))
    if result.restart_required:
        log.warning("config_reload_needs_restart", keys=result.restart_required)
    # What needs a restart stays as it runs, so that the config the gateway reports is the
    # one it applies.
    now, was = new.fairness, old.fairness
    fairness = replace(now, policy=was.policy, input_price=was.input_price,
                       output_price=was.output_price)  # fmt: skip
    new = replace(new, server=old.server, state=old.state, sim=old.sim, logging=old.logging,
                  routing=old.routing, fairness=fairness)  # fmt: skip
    gw.keys = KeyRing(new.tenants, new.admin.key_digests)
    gw.gate.core.reconfigure(new)
    gw.cfg, gw.raw = new, raw
    added, removed, changed = diff_engines(old, new)
    deadline = new.server.drain_timeout_s
    for e in removed:
        if e.id in gw.registry.engines:
            gw.fleet.drain(e.id, deadline)
            result.removed.append(e.id)
    for e in added:
        try:
            await gw.fleet.add(e)
        except (OSError, ValueError) as exc:
            result.errors.append(f"engine {e.id}: {exc}")
            log.error("engine_add_failed", engine=e.id, error=str(exc))
            continue
        result.added.append(e.id)
    for e in changed:
        before = gw.fleet.config_of(e.id)
        if before is not None and _only_limits(before, e):
            gw.fleet.update(e)
        else:
            gw.fleet.spawn(_replace(gw, e, deadline))
        result.changed.append(e.id)
    metrics.labels("ok").inc()
    log.info("config_reloaded", added=result.added, removed=result.removed,
             changed=result.changed)  # fmt: skip
    return result


async def _replace(gw: Gateway, e: EngineConfig, deadline: float) -> None:
    """An engine's address or model changed: the old one drains, then the new one joins."""
    if e.id in gw.registry.engines:
        await gw.fleet.remove(e.id, deadline)
    await gw.fleet.add(e)


def _failed(gw: Gateway, errors: list[str]) -> ReloadResult:
    gw.metrics.config_reloads.labels("error").inc()
    for err in errors:
        log.error("config_reload_rejected", error=err)
    return ReloadResult(False, errors)
