"""`GET /admin/tenants`: weights, service counters, token buckets and queues, live."""

from __future__ import annotations

from typing import Any

from gateway.core.admission import bucket_keys
from gateway.http.gate import Gate


async def tenants_view(gate: Gate) -> dict[str, Any]:
    cfg, d = gate.cfg, gate.dispatcher
    out: dict[str, Any] = {}
    for name, tenant in cfg.tenants.items():
        apps: dict[str, Any] = {}
        tenant_bucket: dict[str, Any] | None = None
        for app in tenant.apps.values():
            keys = bucket_keys(tenant, app)
            levels = dict(zip((k for k, _ in keys), await gate.store.levels(keys), strict=True))
            limits = dict(keys)
            if name in limits:
                tenant_bucket = _bucket(limits[name].per_minute, limits[name].burst, levels[name])
            app_key = f"{name}/{app.name}"
            apps[app.name] = {
                "expected_prompt_tokens": app.expected_prompt_tokens,
                "expected_output_tokens": app.expected_output_tokens,
                "calls_per_interaction": app.calls_per_interaction,
                "bucket": _bucket(app.tokens_per_minute, app.burst_tokens, levels[app_key])
                if app_key in levels
                else None,
            }
        models = {
            model: {
                "counter": policy.counters().get(name, 0.0),
                "queued": policy.backlog(name),
            }
            for model, policy in d.policies.items()
        }
        out[name] = {
            "weight": tenant.weight,
            "bucket": tenant_bucket,
            "apps": apps,
            "models": models,
        }
    return {
        "policy": cfg.fairness.policy,
        "tenants": out,
        "engines": {
            eid: {
                "running": load.running,
                "tokens": load.tokens,
                "max_running": d.limits[eid].max_running,
                "max_tokens": d.limits[eid].max_tokens,
            }
            for eid, load in d.load.items()
        },
    }


def _bucket(per_minute: float, burst: float, level: float) -> dict[str, float]:
    return {"tokens_per_minute": per_minute, "burst_tokens": burst, "tokens": round(level, 1)}
