"""The admin API (admin keys only): tenants, the fleet, config reload.

- `GET /admin/tenants`: weights, service counters, token buckets, queues, engine load, live.
- `GET /admin/engines`: every engine (id, region, model, url, kind, state, in flight, limits).
- `POST /admin/engines`: one `[[engines.REGION."MODEL"]]` entry plus `region` and `model`
  joins the fleet (`kind = "sim"` starts a simulated engine in-process); 400 names the field.
- `POST /admin/engines/{id}/drain`: no new requests; leaves when its last one ends.
- `DELETE /admin/engines/{id}`: the same, then gone (200 if it left at once, else 202).
- `POST /admin/reload`: re-read the config file (as SIGHUP does); 400 with the errors.
- `GET /admin/demand?minutes=N`: requests and tokens per minute per (model, region, class),
  the last N minutes (default 60), summed over every replica when state is in Redis.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import orjson
from aiohttp import web

from engines.protocol import error_body, json_response
from gateway.config.schema import ConfigError, parse
from gateway.core.admission import bucket_keys
from gateway.core.errors import ApiError, bad_request
from gateway.fleet.registry import EngineState
from gateway.http.gate import Gate
from gateway.http.holds import holds_of
from gateway.http.reload import reload_config
from gateway.http.state import GATEWAY, Gateway


async def tenants_view(gate: Gate) -> dict[str, Any]:
    cfg, d, ledger = gate.cfg, gate.dispatcher, gate.core.ledger
    holds = holds_of(gate)
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
            "requests_in_flight": holds.requests.get(name, 0),
            "body_bytes_in_flight": holds.body_bytes.get(name, 0),
        }
    return {
        "policy": cfg.fairness.policy,
        "tenants": out,
        "engines": {
            eid: {
                "running": load.requests,
                "tokens": load.kv_tokens,
                "max_running": load.limit.max_running,
                "max_tokens": load.limit.max_tokens,
            }
            for eid, load in ledger.loads.items()
        },
    }


def _bucket(per_minute: float, burst: float, level: float) -> dict[str, float]:
    return {"tokens_per_minute": per_minute, "burst_tokens": burst, "tokens": round(level, 1)}


def _admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    gw.keys.authenticate_admin(request.headers.get("Authorization"))
    return gw


async def admin_tenants(request: web.Request) -> web.Response:
    return json_response(await tenants_view(_admin(request).gate))


def engine_view(gw: Gateway, e: EngineState) -> dict[str, Any]:
    load = gw.gate.core.ledger.loads.get(e.id)
    return {
        "id": e.id, "region": e.region, "model": e.model, "url": e.url, "kind": e.kind,
        "state": e.state, "in_flight": 0 if load is None else load.requests,
        # Other replicas' requests there (shared state; 0 with one replica).
        "in_flight_elsewhere": 0 if load is None else load.others,
        "max_running": None if load is None else load.limit.max_running,
        "max_kv_tokens": None if load is None else load.limit.max_tokens,
        "running": e.running, "waiting": e.waiting, "kv_usage": e.kv_usage,
    }  # fmt: skip


async def list_engines(request: web.Request) -> web.Response:
    gw = _admin(request)
    return json_response({"engines": [engine_view(gw, e) for e in gw.registry.engines.values()]})


def _engine_state(gw: Gateway, request: web.Request) -> EngineState:
    eid = request.match_info["id"]
    e = gw.registry.engines.get(eid)
    if e is None:
        raise ApiError(404, f"No engine '{eid}' in the fleet.", param="id",
                       code="engine_not_found")  # fmt: skip
    return e


_PREFIX = re.compile(r"^engines\.[^ ]*?\[0\]\.?")


async def add_engine(request: web.Request) -> web.Response:
    gw = _admin(request)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object: one engine entry plus region and model")
    entry = dict(body)
    for name in ("region", "model"):
        if not isinstance(entry.get(name), str) or not entry[name]:
            raise bad_request(f"{name} is required (a non-empty string)", name)
    region, model = entry.pop("region"), entry.pop("model")
    if "id" not in entry:
        entry["id"] = next(f"{region}/{model}/{i}" for i in range(len(gw.registry.engines) + 1)
                           if f"{region}/{model}/{i}" not in gw.registry.engines)  # fmt: skip
    if isinstance(entry["id"], str) and entry["id"] in gw.registry.engines:
        raise ApiError(409, f"An engine '{entry['id']}' is already in the fleet.", param="id",
                       code="engine_exists")  # fmt: skip
    doc = {**gw.raw, "engines": {region: {model: [entry]}}}
    try:
        cfg = parse(doc)
    except ConfigError as exc:
        mine = [m for m in exc.errors if m.startswith("engines")] or list(exc.errors)
        first = _PREFIX.sub("", mine[0])
        field = first.split(" ", 1)[0].strip("'\"") or None
        raise bad_request("; ".join(_PREFIX.sub("", m) for m in mine), field) from None
    (e,) = cfg.engines
    try:
        state = await gw.fleet.add(e)
    except (OSError, ValueError) as exc:
        raise bad_request(f"engine {e.id} could not start: {exc}") from None
    return json_response(engine_view(gw, state), status=201)


def _deadline(request: web.Request, gw: Gateway) -> float:
    raw = request.query.get("timeout_s")
    if raw is None:
        return gw.cfg.server.drain_timeout_s
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 86400:
        raise bad_request(f"timeout_s must be a number of seconds in [0, 86400], got {raw!r}",
                          "timeout_s")  # fmt: skip
    return value


async def drain_engine(request: web.Request) -> web.Response:
    gw = _admin(request)
    e = _engine_state(gw, request)
    gw.fleet.drain(e.id, _deadline(request, gw))
    return json_response(engine_view(gw, e), status=202)


async def delete_engine(request: web.Request) -> web.Response:
    gw = _admin(request)
    e = _engine_state(gw, request)
    deadline = _deadline(request, gw)
    if not gw.gate.core.ledger.in_flight(e.id):
        await gw.fleet.remove(e.id, deadline)
        return json_response({**engine_view(gw, e), "state": "removed"})
    gw.fleet.drain(e.id, deadline)  # it leaves when its last request ends
    return json_response(engine_view(gw, e), status=202)


async def reload(request: web.Request) -> web.Response:
    result = await reload_config(_admin(request))
    if result.ok:
        return json_response(result.body())
    body = error_body(400, "The config file is invalid; nothing was changed: "
                      + "; ".join(result.errors), code="invalid_config")  # fmt: skip
    return json_response({**body, "errors": result.errors}, status=400)


MAX_DEMAND_MINUTES = 7 * 24 * 60


async def admin_demand(request: web.Request) -> web.Response:
    gw = _admin(request)
    raw = request.query.get("minutes", "60")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DEMAND_MINUTES:
        raise bad_request(f"minutes must be an integer from 1 to {MAX_DEMAND_MINUTES}, "
                          f"got {raw[:32]!r}", "minutes")  # fmt: skip
    core = gw.gate.core
    until = int(core.clock() // 60) + 1  # the minute under way included
    since = until - int(raw)
    demand, scope = core.demand, "replica"
    if gw.shared_demand is not None:
        # Redis not answering: this replica's own counts, and `scope` says so.
        with contextlib.suppress(*gw.shared_demand.errors):
            demand, scope = await gw.shared_demand.read(since, until), "replicas"
    series = []
    for model, region, klass in demand.series_keys():
        points = demand.series((model, region, klass), since, until)
        series.append({
            "model": model, "region": region, "class": klass,
            "requests": [p.requests for p in points],
            "prompt_tokens": [p.prompt_tokens for p in points],
            "output_tokens": [p.output_tokens for p in points],
        })  # fmt: skip
    return json_response({"minute_start": since, "minutes": until - since, "scope": scope,
                          "series": series})  # fmt: skip


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/tenants", admin_tenants)
    router.add_get("/admin/demand", admin_demand)
    router.add_get("/admin/engines", list_engines)
    router.add_post("/admin/engines", add_engine)
    router.add_post("/admin/engines/{id:.+}/drain", drain_engine)
    router.add_delete("/admin/engines/{id:.+}", delete_engine)
    router.add_post("/admin/reload", reload)
