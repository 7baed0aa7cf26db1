"""The planner's actuators against real things: `fairway sim` processes on free ports joining
a live gateway and leaving it after a drain, simulated engines that count as starting until
they join, a dry run that changes nothing, and Deployments scaled through a small fake of the
Kubernetes API server (the outermost edge) that speaks the scale subresource.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

from gateway.fleet.planning import PLANNER, FleetAdapter
from gateway.http.auth import digest
from gateway.http.state import Gateway
from planner.actuators import EngineShape, ProcessActuator, SimActuator
from planner.controller import Decision, DemandKey, Drain, EngineRecord, Start
from planner.kubernetes import KubernetesActuator, deployment_name
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict

ADMIN = "sk-test-admin"
KEY = (MODEL, "us-east", "H100")
EU = (MODEL, "eu-west", "A100")
SHAPES = {(MODEL, "H100"): EngineShape(MODEL), (MODEL, "A100"): EngineShape(MODEL)}


def decision(starts: Sequence[Start] = (), drains: Sequence[Drain] = ()) -> Decision:
    return Decision(at=0.0, status="ok", plan=None, wanted={}, now={}, starts=tuple(starts),
                    drains=tuple(drains))  # fmt: skip


async def wait_for(predicate: Any, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def gateway_config(**planner: Any) -> dict[str, Any]:
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}})
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    if planner:
        cfg["planner"] = {
            "enabled": True, "slot_minutes": 1, "slots": 3, "headroom": 0.0,
            "gpus": {"H100": {"cost_per_hour": 1.0}},
            "models": {MODEL: {"H100": {"tokens_per_s": 1.0, "startup_min": 0.0}}},
            **planner,
        }  # fmt: skip
    return cfg


def client_for(server: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0,
                              timeout=30)  # fmt: skip


async def ask(c: openai.AsyncOpenAI, n: int) -> None:
    await asyncio.gather(*(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
    ) for _ in range(n)))  # fmt: skip


def planned(gw: Gateway) -> list[str]:
    return sorted(e for e in gw.registry.engines if "/plan-" in e)


async def test_process_actuator_runs_fairway_sim_engines(start_gateway: GatewayFactory) -> None:
    server, gw = await start_gateway(gateway_config())
    port = FleetAdapter(gw.fleet, gw.gate.core.clock)
    command = (f"{sys.executable} -m gateway.cli sim --model {{model}} --gpu {{gpu}} "
               "--port {port} --time-scale 0.02 --seed 1")  # fmt: skip
    actuator = ProcessActuator(port, SHAPES, [KEY], command, start_timeout_s=60)
    failed: list[EngineRecord] = []
    actuator.on_failure(failed.append)
    try:
        await actuator.apply(decision([Start(*KEY, count=2)]))
        assert {e.status for e in await actuator.engines() if "/plan-" in e.id} == {"starting"}
        await wait_for(lambda: len(planned(gw)) == 2, within=60)
        listed = {e.id: e.status for e in await actuator.engines()}
        assert listed == {f"us-east/{MODEL}/0": "serving", **dict.fromkeys(planned(gw), "serving")}
        urls = {gw.registry.engines[e].url for e in planned(gw)}
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        async with client_for(server) as c:
            await ask(c, 12)
        reg = gw.metrics.registry
        labels = {"tenant": "acme", "model": MODEL, "status": "200"}
        served = [reg.get_sample_value("fairway_requests_total", {**labels, "engine": e}) or 0
                  for e in planned(gw)]  # fmt: skip
        assert sum(served) > 0  # the new engines take requests
        # Drained: it leaves the fleet, then its process is stopped.
        first, second = planned(gw)
        proc = actuator.procs[first]
        await actuator.apply(decision(drains=[Drain(first, *KEY, 5.0, 0.0)]))
        await wait_for(lambda: first not in gw.registry.engines and proc.returncode is not None)
        assert proc.returncode == 0 and failed == []  # SIGTERM: `fairway sim` stops cleanly
        # A process that dies on its own is reported failed and leaves the fleet.
        os.kill(actuator.procs[second].pid, signal.SIGKILL)
        await wait_for(lambda: bool(failed))
        assert failed[0].id == second and failed[0].status == "failed"
        assert failed[0].detail.startswith(f"exited with status {-signal.SIGKILL}")
        await wait_for(lambda: second not in gw.registry.engines)
    finally:
        await actuator.close()
    assert actuator.procs == {}


async def test_process_actuator_reports_an_engine_that_never_gets_healthy(
    start_gateway: GatewayFactory,
) -> None:
    _, gw = await start_gateway(gateway_config())
    port = FleetAdapter(gw.fleet, gw.gate.core.clock)
    # Listens nowhere: alive, never healthy.
    sleeps = f"{sys.executable} -c 'import time; time.sleep(60)' {{port}}"
    actuator = ProcessActuator(port, SHAPES, [KEY], sleeps, start_timeout_s=0.5)
    failed: list[EngineRecord] = []
    actuator.on_failure(failed.append)
    await actuator.apply(decision([Start(*KEY)]))
    await wait_for(lambda: bool(failed))
    assert "not healthy at http://127.0.0.1:" in failed[0].detail
    assert actuator.procs == {} and planned(gw) == [] and await actuator.engines() != []
    await actuator.close()


async def test_sim_actuator_engines_count_as_starting_until_they_join(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway(gateway_config())
    port = FleetAdapter(gw.fleet, gw.gate.core.clock)
    actuator = SimActuator(port, SHAPES, [KEY, EU], startup_s=0.3)
    await actuator.apply(decision([Start(*KEY), Start(*EU)]))
    starting = [e for e in await actuator.engines() if e.status == "starting"]
    assert sorted(e.key for e in starting) == sorted([KEY, EU]) and planned(gw) == []
    await wait_for(lambda: len(planned(gw)) == 2)
    assert {gw.fleet.config_of(e).gpu for e in planned(gw)} == {"H100", "A100"}  # type: ignore[union-attr]
    async with client_for(server) as c:
        await ask(c, 6)
    eu = next(e for e in planned(gw) if e.startswith("eu-west"))
    await actuator.apply(decision(drains=[Drain(eu, *EU, 5.0, 0.0)]))
    await wait_for(lambda: eu not in gw.registry.engines)
    assert [e.key for e in await actuator.engines()] == [KEY, KEY]
    await actuator.close()


class RecordedDemand:
    def __init__(self, series: Mapping[DemandKey, Sequence[float]]) -> None:
        self.series = series

    async def history(self, minutes: int, now: float) -> Mapping[DemandKey, Sequence[float]]:
        return self.series


async def test_dry_run_changes_nothing(start_gateway: GatewayFactory) -> None:
    server, gw = await start_gateway(gateway_config(interval_s=3600.0, min_lifetime_s=0.0,
                                                    actuator={"kind": "dry-run"}))  # fmt: skip
    controller = server.app[PLANNER]
    await wait_for(lambda: controller.runs >= 1)
    before = sorted(gw.registry.engines)
    controller.demand = RecordedDemand({(MODEL, "us-east", "interactive"): [240.0] * 3})
    d = await controller.step()
    assert d.status == "ok" and d.wanted[KEY] == 4 and [s.count for s in d.starts] == [3]
    await asyncio.sleep(0.2)
    assert sorted(gw.registry.engines) == before
    assert controller.actuator.decisions[-1] is d  # type: ignore[attr-defined]
    controller.demand = RecordedDemand({})
    d = await controller.step()
    assert d.wanted[KEY] == 0 and [x.engine_id for x in d.drains] == before
    await asyncio.sleep(0.2)
    assert all(e.state == "active" for e in gw.registry.engines.values())


class FakeKubernetes:
    """The scale subresource of Deployments, as the Kubernetes API server speaks it."""

    def __init__(self, deployments: dict[str, int]) -> None:
        self.spec = dict(deployments)
        self.ready = dict(deployments)
        self.calls: list[tuple[str, str, str]] = []  # method, path, Authorization
        self.app = web.Application()
        path = "/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"
        self.app.router.add_get(path, self.get)
        self.app.router.add_patch(path, self.patch)

    def _scale(self, ns: str, name: str) -> web.Response:
        return web.json_response({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": self.spec[name]},
            "status": {"replicas": self.ready[name], "selector": f"app={name}"},
        })  # fmt: skip

    def _missing(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.method, request.path, request.headers.get("Authorization", "")))
        name = request.match_info["name"]
        if name in self.spec:
            return None
        return web.json_response({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
            "message": f'deployments.apps "{name}" not found', "code": 404,
        }, status=404)  # fmt: skip

    async def get(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        return self._missing(request) or self._scale(ns, name)

    async def patch(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        missing = self._missing(request)
        if missing is not None:
            return missing
        body = json.loads(await request.read())
        self.spec[name] = int(body["spec"]["replicas"])
        return self._scale(ns, name)


async def test_kubernetes_actuator_scales_deployments(aiohttp_server: Any, tmp_path: Path) -> None:
    us = deployment_name("fairway-{model}-{region}-{gpu}", KEY)
    assert us == "fairway-llama-3.1-8b-us-east-h100"
    fake = FakeKubernetes({us: 1})
    server = await aiohttp_server(fake.app)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": str(server.make_url("")).rstrip("/")}}],
        "users": [{"name": "planner", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "planner"}}],
    }))  # fmt: skip
    now = [1000.0]
    actuator = KubernetesActuator([KEY, EU], lambda: now[0], namespace="fairway",
                                  kubeconfig=str(kubeconfig))  # fmt: skip
    failed: list[EngineRecord] = []
    actuator.on_failure(failed.append)
    try:
        engines = await actuator.engines()
        assert [(e.key, e.status, e.started_at) for e in engines] == [(KEY, "serving", 0.0)]
        # Two more in us-east; one in eu-west, whose Deployment does not exist.
        await actuator.apply(decision([Start(*KEY, count=2), Start(*EU)]))
        assert fake.spec[us] == 3
        assert len(failed) == 1 and failed[0].key == EU and "not found" in failed[0].detail
        assert ("PATCH", f"/apis/apps/v1/namespaces/fairway/deployments/{us}/scale",
                "Bearer t0ken") in fake.calls  # fmt: skip
        # Asked for, not yet running: starting, with the time they were asked for.
        engines = await actuator.engines()
        assert [(e.status, e.started_at) for e in engines] == [
            ("serving", 0.0),
            ("starting", 1000.0),
            ("starting", 1000.0),
        ]
        fake.ready[us] = 3
        now[0] = 2000.0
        await actuator.apply(decision(drains=[Drain(engines[-1].id, *KEY, 30.0, 1000.0)]))
        assert fake.spec[us] == 2
        engines = await actuator.engines()
        assert [(e.status, e.started_at) for e in engines] == [
            ("serving", 0.0),
            ("serving", 1000.0),
        ]
    finally:
        await actuator.close()
