"""The planner's controller against a live gateway: it scales simulated engines ahead of rising
demand and drains them when it falls (never one younger than min_lifetime_s), no request fails
meanwhile; an infeasible program keeps the last good plan and reports its shortfalls; a start
that fails is re-planned without it. Also the pure step's guards, `[planner]` validation and
`fairway plan` from a file and from a live gateway.

The gateway's clock runs 60 times faster than the wall clock here (a minute of demand a
second), so that forecasts, slots and engine ages move within a test.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import tomli_w

from gateway.cli import main as fairway
from gateway.config.schema import ConfigError, parse
from gateway.fleet.planning import PLANNER, fast_clock
from gateway.http.auth import digest
from gateway.http.state import Gateway
from planner.controller import Controller, Decision, DemandKey, EngineRecord, decide
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict, scrape

ADMIN = "sk-test-admin"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
KEY = (MODEL, "us-east", "H100")
PROMPT = "word " * 80  # about 106 prompt tokens with the chat template


def planner_config(**planner: Any) -> dict[str, Any]:
    actuator = planner.pop("actuator", {"kind": "sim"})
    model = planner.pop("model", {})
    cfg = config_dict({"us-east": {MODEL: [{"kind": "sim"}]}})
    cfg["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    cfg["planner"] = {
        "enabled": True, "interval_s": 0.2, "slot_minutes": 1, "slots": 4, "history_minutes": 3,
        "quantile": 0.9, "headroom": 0.0, "min_lifetime_s": 300.0, "drain_deadline_s": 5.0,
        "gpus": {"H100": {"cost_per_hour": 1.0}},
        "models": {MODEL: {"H100": {"tokens_per_s": 1.0, "startup_min": 0.0, **model}}},
        "quotas": {"us-east": {"H100": 8}}, "min_engines": {"us-east": {MODEL: 1}},
        "actuator": actuator, **planner,
    }  # fmt: skip
    return cfg


class RecordedDemand:
    """Demand as a recording gives it: per (model, region, class), prompt tokens a minute."""

    def __init__(self, series: Mapping[DemandKey, Sequence[float]]) -> None:
        self.series = dict(series)

    async def history(self, minutes: int, now: float) -> Mapping[DemandKey, Sequence[float]]:
        return {k: list(v)[-minutes:] for k, v in self.series.items()}


def steady(tokens_per_s: float, minutes: int = 3) -> dict[DemandKey, list[float]]:
    return {(MODEL, "us-east", "interactive"): [tokens_per_s * 60] * minutes}


def recording(c: Controller) -> list[Decision]:
    """Every decision `c` applies from now on (the metrics hook still runs)."""
    seen: list[Decision] = []
    hook = c.on_decision

    def record(d: Decision) -> Any:
        seen.append(d)
        return hook(d) if hook is not None else None

    c.on_decision = record
    return seen


def planned(gw: Gateway) -> list[str]:
    return sorted(e for e in gw.registry.engines if "/plan-" in e)


def active(gw: Gateway) -> int:
    return sum(e.state != "draining" for e in gw.registry.engines.values())


async def wait_for(predicate: Any, within: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def traffic(c: openai.AsyncOpenAI, rate: float, seconds: float) -> list[str]:
    """Chat requests at `rate` a second for `seconds`; returns every failure."""
    failures: list[str] = []

    async def one() -> None:
        try:
            await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
            )
        except openai.APIError as exc:
            failures.append(repr(exc))

    tasks = []
    for _ in range(round(rate * seconds)):
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    return failures


async def test_scales_ahead_of_rising_demand_and_drains_old_engines_only(
    start_gateway: GatewayFactory,
) -> None:
    server, gw = await start_gateway(planner_config(model={"tokens_per_s": 0.5}))
    gw.gate.core.clock = fast_clock(120.0)  # two minutes a second
    controller = server.app[PLANNER]
    seen = recording(controller)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME,
                                max_retries=0, timeout=30)  # fmt: skip
    # A request a second is about 0.9 prompt tokens/s, an engine takes 0.5: 4 a second want
    # about 7 engines, 1 a second 2.
    failures = await traffic(client, 1.0, 1.0)
    failures += await traffic(client, 4.0, 2.0)
    await wait_for(lambda: active(gw) >= 5)
    peak = active(gw)
    # Falling demand: engines leave, but only those past min_lifetime_s (2.5 s here).
    failures += await traffic(client, 1.0, 4.0)
    await wait_for(lambda: active(gw) <= 3)
    assert failures == []
    ups = [d for d in seen if d.starts]
    assert ups and ups[0].status in ("ok", "infeasible")
    # The first start was for demand forecast above what the engines then gave.
    first = ups[0]
    assert first.plan is not None and first.plan.first_slot()[KEY] > first.now[KEY]
    drains = [x for d in seen for x in d.drains]
    assert drains and peak >= 5
    assert all(x.age_s >= 300.0 for x in drains), [(x.engine_id, x.age_s) for x in drains]
    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/metrics")) as resp:
            body = await resp.text()
        async with http.get(server.make_url("/admin/planner"), headers=ADMIN_AUTH) as resp:
            view = await resp.json()
    assert scrape(body, "fairway_planner_last_run_status", status="error") == 0
    assert scrape(body, "fairway_planner_engines_wanted", model=MODEL, region="us-east") >= 1
    assert view["enabled"] and view["actuator"] == "sim" and view["runs"] >= len(seen)
    await client.close()


async def test_an_infeasible_program_keeps_the_last_plan_and_reports(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    cfg = planner_config(interval_s=3600.0, quotas={"us-east": {"H100": 2}})
    server, gw = await start_gateway(cfg)
    controller = server.app[PLANNER]
    await wait_for(lambda: controller.runs >= 1)  # the loop's own first run, then it sleeps
    controller.demand = RecordedDemand(steady(1.5))
    good = await controller.step()
    assert good.status == "ok" and good.wanted[KEY] == 2
    assert controller.last_plan is good.plan
    await wait_for(lambda: active(gw) == 2)
    # Five engines' worth of demand, two allowed by the quota.
    controller.demand = RecordedDemand(steady(5.0))
    bad = await controller.step()
    assert bad.status == "infeasible"
    assert {s.kind for s in bad.shortfalls} == {"quota"}
    assert "H100 2/2 GPUs" in bad.shortfalls[0].detail
    assert controller.last_plan is good.plan  # the last good plan is kept
    assert bad.wanted[KEY] == 2 and not bad.changes  # the best effort: the whole quota
    assert "no feasible plan" in controller.last_error
    async with http.get(server.make_url("/admin/planner"), headers=ADMIN_AUTH) as resp:
        view = await resp.json()
    assert view["status"] == "infeasible" and view["shortfalls"][0]["kind"] == "quota"
    async with http.get(server.make_url("/admin/planner")) as resp:
        assert resp.status == 401
    async with http.get(server.make_url("/metrics")) as resp:
        body = await resp.text()
    assert scrape(body, "fairway_planner_last_run_status", status="infeasible") == 1
    assert scrape(body, "fairway_planner_last_run_status", status="ok") == 0
    assert active(gw) == 2


async def test_a_failed_start_is_replanned_without_it(start_gateway: GatewayFactory) -> None:
    exits = f"{sys.executable} -c 'import sys; sys.exit(3)' {{port}}"
    cfg = planner_config(interval_s=0.5, retry_after_s=120.0,
                         actuator={"kind": "process", "command": exits})  # fmt: skip
    server, gw = await start_gateway(cfg)
    gw.gate.core.clock = fast_clock(60.0)  # a minute a second
    controller = server.app[PLANNER]
    seen = recording(controller)
    controller.demand = RecordedDemand(steady(1.5))
    await wait_for(lambda: any(d.starts for d in seen))
    assert [s.count for s in next(d for d in seen if d.starts).starts] == [1]
    # The process exits; the controller is woken and re-plans with it left out, holding the
    # start where it failed until retry_after_s (2 s here) has passed, then tries again.
    await wait_for(lambda: any(d.left_out for d in seen))
    replan = next(d for d in seen if d.left_out)
    assert replan.now[KEY] == 1 and replan.held == {KEY: 1} and not replan.starts
    assert next(e.detail for e in controller.failed).startswith("exited with status 3")
    await wait_for(lambda: len({i for d in seen for i in d.left_out}) >= 2, within=20)
    assert planned(gw) == []  # never in the fleet
    assert active(gw) == 1


def test_decide_guards() -> None:
    cfg = parse(planner_config(min_lifetime_s=600.0))
    s = cfg.planner.settings(("us-east",))
    now = 10_000.0
    old = EngineRecord("old", *KEY, now - 3600, "serving")
    young = EngineRecord("young", *KEY, now - 60, "serving")
    starting = EngineRecord("starting", *KEY, now - 10, "starting")
    draining = EngineRecord("draining", *KEY, now - 7200, "draining")
    # No demand: one engine wanted (min_engines); only the old one may go, the young are held.
    d = decide(steady(0.0), [old, young, starting, draining], s, now)
    assert d.status == "ok" and d.wanted[KEY] == 1 and d.now[KEY] == 3
    assert [x.engine_id for x in d.drains] == ["old"] and d.held == {KEY: 1}
    # Engines still starting count as allocated: no second start for the same demand.
    d = decide(steady(1.5), [old, starting], s, now)
    assert d.wanted[KEY] == 2 and not d.changes
    # A failed one does not count; the plan replaces it unless it failed just now.
    failed = EngineRecord("failed", *KEY, now - 1000, "failed", "exited")
    d = decide(steady(1.5), [old, failed], s, now)
    assert d.left_out == ("failed",) and [(x.key, x.count) for x in d.starts] == [(KEY, 1)]
    d = decide(steady(1.5), [old, EngineRecord("f", *KEY, now - 5, "failed")], s, now)
    assert not d.starts and d.held == {KEY: 1}


def test_planner_config_errors_name_the_field() -> None:
    cfg = planner_config(slots=0, solver="glpk")
    cfg["planner"]["actuator"] = {"kind": "process", "command": "fairway sim"}
    with pytest.raises(ConfigError) as info:
        parse(cfg)
    errors = "\n".join(info.value.errors)
    assert "planner.slots must be >= 1, got 0" in errors
    assert "planner.solver must be 'auto', 'cbc' or 'highs', got 'glpk'" in errors
    assert "planner.actuator.command must contain {port}" in errors
    # Entries checked against each other once each is valid.
    cfg = planner_config()
    cfg["planner"]["models"][MODEL]["B200"] = {"tokens_per_s": 1.0}
    cfg["planner"]["quotas"]["us-east"]["TPU"] = 4
    with pytest.raises(ConfigError) as info:
        parse(cfg)
    errors = "\n".join(info.value.errors)
    assert """planner.models."llama-3.1-8b".B200: GPU type 'B200' has no [planner.gpus""" in errors
    assert """planner.models."llama-3.1-8b".B200: a sim engine needs a preset GPU""" in errors
    assert "planner.quotas.us-east.TPU names an unknown GPU type" in errors
    slo = planner_config(model={"tokens_per_s": 0.0, "tpot_slo_ms": 0.01})
    with pytest.raises(ConfigError, match=r'planner.models."llama-3.1-8b".H100: cannot meet'):
        parse(slo)
    assert not parse(config_dict()).planner.enabled  # off unless asked for


def plan_files(tmp_path: Path, **planner: Any) -> Path:
    cfg = planner_config(**planner)
    cfg["planner"]["enabled"] = False  # `fairway plan` reads the table whether or not it runs
    path = tmp_path / "config.toml"
    path.write_bytes(tomli_w.dumps(cfg).encode())
    return path


def demand_body(tokens_per_minute: float, minutes: int = 5) -> dict[str, Any]:
    return {"minute_start": 29_000_000, "minutes": minutes + 1, "scope": "replica",
            "series": [{"model": MODEL, "region": "us-east", "class": "interactive",
                        "requests": [1] * (minutes + 1), "output_tokens": [0] * (minutes + 1),
                        "prompt_tokens": [tokens_per_minute] * (minutes + 1)}]}  # fmt: skip


def test_fairway_plan_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = plan_files(tmp_path)
    demand = tmp_path / "demand.json"
    demand.write_text(json.dumps(demand_body(3 * 60)))  # 3 tokens/s: three engines
    assert fairway(["plan", "--config", str(config), "--demand", str(demand)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(MODEL))
    assert row.split() == [MODEL, "us-east", "H100", "1", "3", "3", "3", "3", "0.20"]
    assert "solved in" in out and "start 2 x llama-3.1-8b/us-east/H100" in out
    # Over the quota: the shortfalls, the best effort, exit 2.
    demand.write_text(json.dumps(demand_body(20 * 60)))
    assert fairway(["plan", "--config", str(config), "--demand", str(demand)]) == 2
    out = capsys.readouterr().out
    assert out.startswith("infeasible") and "GPU quota of us-east full" in out
    demand.write_text('{"minutes": "many"}')
    assert fairway(["plan", "--config", str(config), "--demand", str(demand)]) == 2
    assert "not what GET /admin/demand returns" in capsys.readouterr().err


def test_fairway_plan_from_a_workload_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from planner import workload

    trace = workload.generate(workload.WorkloadConfig(days=1, peak_rps=0.05, seed=3))
    workload.save(trace, tmp_path / "week.npz")
    config = plan_files(tmp_path, model={"tokens_per_s": 100.0}, quotas={})
    args = ["plan", "--config", str(config), "--demand", str(tmp_path / "week.npz")]
    assert fairway([*args, "--at", "900"]) == 0
    out = capsys.readouterr().out
    at_peak = int(next(ln for ln in out.splitlines() if ln.startswith(MODEL)).split()[4])
    tokens = trace.demand().prompt_tokens[0, 0, 0, 897:900]  # llama-3.1-8b, us-east
    assert at_peak >= max(1, round(float(tokens.mean()) / 60 / 100))
    assert fairway([*args, "--at", "99999"]) == 2


async def test_fairway_plan_from_a_live_gateway(
    start_gateway: GatewayFactory,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = plan_files(tmp_path, model={"tokens_per_s": 10.0}, quotas={})
    cfg = planner_config()
    cfg["planner"]["enabled"] = False
    server, gw = await start_gateway(cfg)
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME,
                                max_retries=0, timeout=30)  # fmt: skip
    # Counted a minute back, so that the minute is whole when the plan is made.
    gw.gate.core.clock = lambda: time.time() - 60
    assert await traffic(client, 20.0, 1.0) == []
    gw.gate.core.clock = time.time
    async with http.get(server.make_url("/admin/demand?minutes=4"), headers=ADMIN_AUTH) as resp:
        (series,) = (await resp.json())["series"]
    last = series["prompt_tokens"][:-1]  # the minute under way is left out
    # The level fallback on three minutes: the 0.9 quantile, in tokens/s, 10 per engine.
    want = math.ceil(max(float(np.quantile(last, 0.9)), sum(last) / 3) / 60 / 10)
    args = ["plan", "--config", str(config), "--url", str(server.make_url("/")), "--minutes", "3"]
    monkeypatch.setenv("FAIRWAY_ADMIN_KEY", ADMIN)
    # In a thread: the command runs its own event loop, as from a shell.
    assert await asyncio.to_thread(fairway, args) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(MODEL))
    assert row.split()[:5] == [MODEL, "us-east", "H100", "1", str(want)] and want >= 2
    assert await asyncio.to_thread(fairway, [*args, "--admin-key", "sk-wrong"]) == 2
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.delenv("FAIRWAY_ADMIN_KEY")
    assert await asyncio.to_thread(fairway, args) == 2
    assert "an admin key is needed" in capsys.readouterr().err
    await client.close()


def test_without_the_planner_extra_serve_and_plan_say_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pulp" else find(name, *a))  # fmt: skip
    example = str(Path(__file__).resolve().parents[1] / "config.planner.toml")
    assert fairway(["serve", "--config", example, "--port", "0"]) == 2
    assert fairway(["plan", "--config", example, "--demand", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert err.count("needs pulp, not installed here: pip install 'fairway-llm[planner]'") == 2
    assert "Traceback" not in err


def test_fairway_plan_names_a_start_up_shortfall(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Demand that the engines running cannot meet before a new one is up (20 minutes to
    start, slots of 15): a plan all the same, with the gap named, not an infeasible program."""
    config = plan_files(tmp_path, models={MODEL: {"H100": {"tokens_per_s": 1.0,
                                                          "startup_min": 20.0}}})  # fmt: skip
    demand = tmp_path / "demand.json"
    demand.write_text(json.dumps(demand_body(3 * 60)))
    assert fairway(["plan", "--config", str(config), "--demand", str(demand)]) == 0
    out = capsys.readouterr().out
    assert "start-up shortfalls" in out and "startup: " in out, out
