"""The planner inside the gateway: its fleet port, its demand, its metrics and admin view.

`build_planner` turns `[planner]` into a `planner.controller.Controller` whose actuator acts
on this gateway's fleet (`FleetPort` over the fleet manager) and whose demand is what the gate
core counts (summed over every replica when state is in Redis). The controller runs on the
core's clock, so that engine ages, demand minutes and plans agree.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import Gauge

from engines.perf_model import PerfModel
from engines.protocol import json_response
from gateway.config.engines import EngineConfig
from gateway.config.planner import PlannerConfig
from gateway.config.schema import Config
from gateway.core.demand import Demand
from gateway.fleet.manager import FleetManager
from gateway.fleet.registry import EngineMode
from gateway.obs.metrics import GatewayMetrics
from gateway.state.demand import SharedDemand
from planner.actuators import (
    DryRunActuator,
    EngineShape,
    EngineSpec,
    FleetEngine,
    FleetPort,
    ProcessActuator,
    SimActuator,
)
from planner.controller import Actuator, Controller, Decision, DemandKey, EngineRecord
from planner.kubernetes import KubernetesActuator
from planner.problem import Key


def fast_clock(speed: float) -> Callable[[], float]:
    """The wall clock from now on, `speed` times faster (`[planner] clock_speed`)."""
    t0, m0 = time.time(), time.monotonic()
    return lambda: t0 + (time.monotonic() - m0) * speed


class FleetAdapter:
    """`planner.actuators.FleetPort` over the gateway's fleet manager."""

    def __init__(self, fleet: FleetManager, clock: Callable[[], float]) -> None:
        self.fleet = fleet
        self._clock = clock
        self.since = clock()  # engines already there count as added now
        self.added: dict[str, float] = {}

    def clock(self) -> float:
        return self._clock()

    def engines(self) -> list[FleetEngine]:
        out = []
        for e in self.fleet.registry.engines.values():
            cfg = self.fleet.config_of(e.id)
            gpu = cfg.gpu if cfg is not None else ""
            out.append(FleetEngine(e.id, e.model, e.region, gpu, self.added.get(e.id, self.since),
                                   e.mode is EngineMode.DRAINING))  # fmt: skip
        return out

    async def add(self, spec: EngineSpec) -> None:
        sh = spec.shape
        sim = not spec.url
        try:
            kv = PerfModel.named(spec.gpu, sh.arch, sh.tp).kv_capacity_tokens if sim else 0
        except KeyError as exc:  # no preset: the actuator reports the start failed
            raise ValueError(exc.args[0]) from None
        e = EngineConfig(id=spec.id, region=spec.region, model=spec.model,
                         kind="sim" if sim else "vllm", url=spec.url, gpu=spec.gpu, arch=sh.arch,
                         tp=sh.tp, max_num_seqs=sh.max_num_seqs, max_running=sh.max_num_seqs,
                         max_kv_tokens=kv)  # fmt: skip
        self.added[spec.id] = self.clock()
        try:
            await self.fleet.add(e)
        except BaseException:
            self.added.pop(spec.id, None)
            raise

    async def remove(self, engine_id: str, deadline_s: float) -> None:
        try:
            await self.fleet.remove(engine_id, deadline_s)
        finally:
            self.added.pop(engine_id, None)


class GatewayDemand:
    """`planner.controller.DemandSource` over the gate core's counts: prompt tokens per
    minute, from the first minute this gateway counted (earlier minutes are unknown, not 0)."""

    def __init__(
        self, local: Demand, shared: SharedDemand | None, clock: Callable[[], float]
    ) -> None:
        self.local = local
        self.shared = shared
        self.first_minute = int(clock() // 60)

    async def history(self, minutes: int, now: float) -> Mapping[DemandKey, Sequence[float]]:
        until = int(now // 60)  # the minute under way is not whole yet
        since = max(until - minutes, self.first_minute)
        demand = self.local
        if self.shared is not None:
            with contextlib.suppress(*self.shared.errors):
                demand = await self.shared.read(since, until)
        return {k: [float(p.prompt_tokens) for p in demand.series(k, since, until)]
                for k in demand.series_keys()}  # fmt: skip


def shapes(pc: PlannerConfig) -> dict[tuple[str, str], EngineShape]:
    return {(m, g): EngineShape(t.arch or m, t.gpus, t.max_num_seqs)
            for m, types in pc.models.items() for g, t in types.items()}  # fmt: skip


def build_actuator(
    pc: PlannerConfig, port: FleetPort, keys: tuple[Key, ...], clock: Callable[[], float]
) -> Actuator:
    a = pc.actuator
    if a.kind == "sim":
        return SimActuator(port, shapes(pc), keys, a.startup_s)
    if a.kind == "process":
        return ProcessActuator(port, shapes(pc), keys, a.command, a.host, a.health_path,
                               a.start_timeout_s, a.stop_timeout_s)  # fmt: skip
    if a.kind == "kubernetes":
        return KubernetesActuator(keys, clock, a.namespace, a.deployment, a.kubeconfig,
                                  a.context)  # fmt: skip

    def listed() -> list[EngineRecord]:
        return [EngineRecord(e.id, e.model, e.region, e.gpu, e.added_at,
                             "draining" if e.draining else "serving")
                for e in port.engines()]  # fmt: skip

    return DryRunActuator(keys, clock, listed)


class PlannerMetrics:
    """`fairway_planner_*` in the gateway's registry."""

    STATUSES = ("ok", "infeasible", "error")

    def __init__(self, metrics: GatewayMetrics) -> None:
        reg = metrics.registry
        labels = ["model", "region", "gpu"]
        self.wanted = Gauge("fairway_planner_engines_wanted",
                            "Engines the last plan wants now.", labels, registry=reg)  # fmt: skip
        self.engines = Gauge("fairway_planner_engines",
                             "Engines counted as allocated (starting or serving) at the last run.",
                             labels, registry=reg)  # fmt: skip
        self.solve_s = Gauge("fairway_planner_solve_seconds",
                             "Solver time of the last run.", registry=reg)  # fmt: skip
        self.status = Gauge("fairway_planner_last_run_status",
                            "1 for the last run's status (ok, infeasible, error), 0 for others.",
                            ["status"], registry=reg)  # fmt: skip
        self.last_run = Gauge("fairway_planner_last_run_timestamp_seconds",
                              "When the planner last ran (the gateway's clock).",
                              registry=reg)  # fmt: skip

    def record(self, d: Decision) -> None:
        for (m, r, g), n in d.wanted.items():
            self.wanted.labels(m, r, g).set(n)
        for (m, r, g), n in d.now.items():
            self.engines.labels(m, r, g).set(n)
        if d.plan is not None and d.status != "error":
            self.solve_s.set(d.plan.solve_s)
        for s in self.STATUSES:
            self.status.labels(s).set(int(s == d.status))
        self.last_run.set(d.at)


def build_planner(
    cfg: Config,
    fleet: FleetManager,
    clock: Callable[[], float],
    demand: Demand,
    shared: SharedDemand | None,
    metrics: GatewayMetrics,
) -> Controller:
    """The controller `cfg.planner` describes, acting on `fleet`."""
    pc = cfg.planner
    regions = tuple(dict.fromkeys(e.region for e in cfg.engines))
    settings = pc.settings(regions)
    port = FleetAdapter(fleet, clock)
    actuator = build_actuator(pc, port, settings.keys, clock)
    gauges = PlannerMetrics(metrics)
    return Controller(settings, GatewayDemand(demand, shared, clock), actuator, pc.interval_s,
                      clock=clock, on_decision=gauges.record)  # fmt: skip


PLANNER = web.AppKey("planner", Controller)


def planner_view(c: Controller) -> dict[str, Any]:
    """What `GET /admin/planner` shows: the last run and the plan behind it."""
    d = c.last
    out: dict[str, Any] = {"actuator": c.actuator.kind, "interval_s": c.interval_s,
                           "runs": c.runs, "last_error": c.last_error}  # fmt: skip
    if d is None:
        return {**out, "status": None}
    out.update(
        status=d.status, at=d.at,
        wanted=[{"model": m, "region": r, "gpu": g, "engines": n, "now": d.now.get((m, r, g), 0),
                 "held": d.held.get((m, r, g), 0)} for (m, r, g), n in sorted(d.wanted.items())],
        starts=[{"model": s.model, "region": s.region, "gpu": s.gpu, "count": s.count}
                for s in d.starts],
        drains=[x.engine_id for x in d.drains], left_out=list(d.left_out),
        shortfalls=[{"kind": s.kind, "model": s.model, "region": s.region, "slot": s.slot,
                     "missing": s.missing, "detail": s.detail} for s in d.shortfalls],
        forecast={"/".join(k): m for k, m in d.methods.items()},
    )  # fmt: skip
    p = d.plan
    if p is not None:
        out["plan"] = {
            "solver": p.solver, "optimal": p.optimal, "solve_s": p.solve_s,
            "gpu_hours": p.gpu_hours, "cost": p.cost,
            "allocations": [{"model": a.model, "region": a.region, "gpu": a.gpu,
                             "engines": list(a.engines)} for a in p.allocations],
        }  # fmt: skip
    return out


async def admin_planner(request: web.Request) -> web.Response:
    from gateway.http.state import GATEWAY

    request.app[GATEWAY].keys.authenticate_admin(request.headers.get("Authorization"))
    c = request.app.get(PLANNER)
    if c is None:
        return json_response({"enabled": False})
    return json_response({"enabled": True, **planner_view(c)})
