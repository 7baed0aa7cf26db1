"""`fairway plan`: one plan, printed, from a live gateway's demand or from a demand file.

The demand is what `GET /admin/demand` returns (read live with an admin key, or saved to a
JSON file; its last minute, the one under way, is left out) or a workload trace written by
`python -m planner.workload` (.npz), planned as of its end or of `--at MINUTE`. The engines
now are the live gateway's (its planner's count when it runs one; else `/admin/engines`, each
engine's GPU type taken from the config by its id), or for a file the config's `[engines]`.
Exit 0 with a plan, 2 when the program is infeasible (the shortfalls printed) or on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.config.schema import Config, ConfigError, load
from planner.problem import Key

if TYPE_CHECKING:
    from planner.controller import Decision, EngineRecord, Settings

# Every `fairway` command builds this parser: the planner's solver and forecasting libraries
# load only when a plan is made.
History = dict[tuple[str, str, str], list[float]]


class PlanError(Exception):
    """Demand or engines that cannot be read; the message says which and why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="config.toml", help="the config with the [planner] table")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a live gateway, e.g. http://127.0.0.1:8080")
    src.add_argument("--demand", type=Path, help="a /admin/demand JSON file or a workload .npz")
    p.add_argument("--admin-key", default=None, help="default: $FAIRWAY_ADMIN_KEY")
    p.add_argument("--minutes", type=int, default=None,
                   help="demand read back (default planner.history_minutes)")  # fmt: skip
    p.add_argument("--at", type=int, default=None,
                   help=".npz: plan as of this minute of the trace (default its end)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from planner.controller import decide

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"fairway plan: invalid configuration {args.config}:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 2
    if not cfg.planner.models:
        print(f"fairway plan: {args.config} has no [planner.models] engine types",
              file=sys.stderr)  # fmt: skip
        return 2
    settings = cfg.planner.settings(tuple(dict.fromkeys(e.region for e in cfg.engines)))
    minutes = args.minutes or settings.history_minutes
    try:
        if args.url:
            key = args.admin_key or os.environ.get("FAIRWAY_ADMIN_KEY", "")
            if not key:
                raise PlanError("an admin key is needed: --admin-key or FAIRWAY_ADMIN_KEY")
            history, engines, now = asyncio.run(_live(args.url, key, minutes, cfg))
        elif args.demand.suffix == ".npz":
            history, now = _from_npz(args.demand, minutes, args.at)
            engines = _configured(cfg)
        else:
            history, now = _from_json(_read_json(args.demand), minutes)
            engines = _configured(cfg)
    except PlanError as exc:
        print(f"fairway plan: {exc}", file=sys.stderr)
        return 2
    d = decide(history, engines, settings, now)
    print(render(d, settings))
    if d.status == "ok":
        return 0
    if d.status == "error":
        print(f"fairway plan: {d.error}", file=sys.stderr)
    return 2


def render(d: Decision, settings: Settings) -> str:
    """The plan as a table: per (model, region, GPU type) engines now, per slot, GPU-hours."""
    slot_minutes = settings.slot_minutes
    gpus = {(e.model, e.gpu): e.gpus for e in settings.engines}
    lines = []
    if d.status == "infeasible":
        lines.append("infeasible: no plan meets every demand; the binding shortfalls:")
        lines += [f"  {s.kind}: {s.detail}" for s in d.shortfalls]
        if d.plan is None:
            return "\n".join(lines)
        lines.append("best-effort plan (misses the least):")
    elif d.shortfalls:
        lines.append("start-up shortfalls (demand no engine asked for now can serve in time):")
        lines += [f"  {s.kind}: {s.detail}" for s in d.shortfalls]
    p = d.plan
    if p is None:
        return "\n".join([*lines, f"no plan: {d.error}"])
    slots = len(p.allocations[0].engines) if p.allocations else 0
    head = ["model", "region", "gpu", "now", *(f"+{i * slot_minutes}m" for i in range(slots)),
            "GPU-h"]  # fmt: skip
    rows = [head]
    for a in p.allocations:
        if not any(a.engines) and not d.now.get((a.model, a.region, a.gpu), 0):
            continue
        hours = sum(a.engines) * gpus[a.model, a.gpu] * slot_minutes / 60
        rows.append([a.model, a.region, a.gpu, str(d.now.get((a.model, a.region, a.gpu), 0)),
                     *(str(n) for n in a.engines), f"{hours:.2f}"])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        cells = zip(r, widths, strict=True)
        lines.append(
            "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(cells))
        )
    optimal = "optimal" if p.optimal else "best found in time"
    lines.append(f"GPU-hours {p.gpu_hours:.2f}, cost {p.cost:.2f}, {p.scale_ups} engines started; "
                 f"solved in {p.solve_s:.3f} s by {p.solver} ({optimal})")  # fmt: skip
    if d.starts or d.drains:
        starts = ", ".join(f"{s.count} x {'/'.join(s.key)}" for s in d.starts) or "none"
        lines.append(
            f"now: start {starts}; drain {', '.join(x.engine_id for x in d.drains) or 'none'}"
        )
    if d.held:
        lines.append("held by min_lifetime_s or a failed start: "
                     + ", ".join(f"{n} x {'/'.join(k)}" for k, n in d.held.items()))  # fmt: skip
    return "\n".join(lines)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"{path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PlanError(f"{path}: not JSON: {exc}") from None


def _from_json(body: Any, minutes: int) -> tuple[History, float]:
    """History and the time of planning from a `/admin/demand` body."""
    try:
        start, count = int(body["minute_start"]), int(body["minutes"])
        history: History = {}
        for s in body["series"]:
            tokens = [float(v) for v in s["prompt_tokens"]]
            if len(tokens) != count:
                raise ValueError(f"series {s['model']}/{s['region']} has {len(tokens)} minutes")
            history[s["model"], s["region"], s["class"]] = tokens[:-1][-minutes:]
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"not what GET /admin/demand returns: {exc!r}") from None
    return history, float((start + count - 1) * 60)


def _from_npz(path: Path, minutes: int, at: int | None) -> tuple[History, float]:
    from planner.workload import load as load_trace
    from planner.workload_trace import CLASSES

    try:
        trace = load_trace(path)
    except (OSError, KeyError, ValueError) as exc:
        raise PlanError(f"{path}: not a workload trace: {exc}") from None
    demand = trace.demand().prompt_tokens
    end = demand.shape[-1] if at is None else at
    if not 1 <= end <= demand.shape[-1]:
        raise PlanError(f"--at must be in [1, {demand.shape[-1]}], got {end}")
    regions = [r.name for r in trace.config.regions]
    history: History = {}
    for m, model in enumerate(trace.config.models):
        for r, region in enumerate(regions):
            for c, klass in enumerate(CLASSES):
                series = demand[m, r, c, max(0, end - minutes) : end]
                history[model, region, klass] = [float(v) for v in series]
    return history, float(end * 60)


def _configured(cfg: Config) -> list[EngineRecord]:
    from planner.controller import EngineRecord

    return [EngineRecord(e.id, e.model, e.region, e.gpu, 0.0, "serving") for e in cfg.engines]


async def _live(
    url: str, key: str, minutes: int, cfg: Config
) -> tuple[History, list[EngineRecord], float]:
    headers = {"Authorization": f"Bearer {key}"}
    base = url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as s:
            # One minute more: the last, under way, is left out.
            demand = await _get(s, f"{base}/admin/demand?minutes={minutes + 1}")
            planner = await _get(s, f"{base}/admin/planner", missing_ok=True)
            listed = await _get(s, f"{base}/admin/engines")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PlanError(f"{base}: {exc or type(exc).__name__}") from None
    history, now = _from_json(demand, minutes)
    if planner and planner.get("enabled") and planner.get("wanted"):
        counts: Mapping[Key, int] = {
            (w["model"], w["region"], w["gpu"]): int(w["now"]) for w in planner["wanted"]
        }
        return history, _records(counts), now
    from planner.controller import EngineRecord

    gpu_of = {e.id: e.gpu for e in cfg.engines}
    types = defaultdict(list)
    for model, by_gpu in cfg.planner.models.items():
        types[model] = list(by_gpu)
    engines, unknown = [], []
    for e in listed.get("engines", []):
        if e.get("state") == "draining":
            continue
        gpu = gpu_of.get(e["id"]) or (types[e["model"]][0] if len(types[e["model"]]) == 1 else "")
        if not gpu:
            unknown.append(e["id"])
            continue
        engines.append(EngineRecord(e["id"], e["model"], e["region"], gpu, 0.0, "serving"))
    if unknown:
        print(f"fairway plan: GPU type unknown, left out: {', '.join(unknown)}", file=sys.stderr)
    return history, engines, now


def _records(counts: Mapping[Key, int]) -> list[EngineRecord]:
    from planner.controller import EngineRecord

    return [EngineRecord(f"{'/'.join(k)}#{i}", *k, 0.0, "serving")
            for k, n in counts.items() for i in range(n)]  # fmt: skip


async def _get(s: aiohttp.ClientSession, url: str, missing_ok: bool = False) -> Any:
    async with s.get(url) as resp:
        if resp.status == 404 and missing_ok:
            return None
        if resp.status != 200:
            text = (await resp.text())[:300]
            raise PlanError(f"GET {url}: HTTP {resp.status}: {text}")
        return await resp.json()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fairway plan", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
