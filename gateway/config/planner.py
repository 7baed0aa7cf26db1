"""The `[planner]` table of `config.toml`: how often Fairway re-plans its engines, what they
cost, what each engine type serves, the GPU quotas, and the actuator that applies the plan.

Off by default. `PlannerConfig.settings(regions)` turns a valid table into the planner's own
values (`planner.controller.Settings`), engine capacities computed from the performance model
where the table does not give them.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Annotated, Literal, Self

from pydantic import Field, StrictBool, StrictFloat, StrictStr, model_validator
from pydantic.dataclasses import dataclass

from engines.perf_model import GPUS, MODELS, PerfModel
from gateway.config.fields import TABLE, Count, Name, Natural, Positive, Problem, one_of, report
from planner.capacity import RequestShape, capacity_at_slo
from planner.problem import EngineType, GpuType

if TYPE_CHECKING:
    # The controller needs the planner extra (PuLP, statsmodels); the config must load without.
    from planner.controller import Settings

ActuatorKind = Literal["sim", "process", "dry-run", "kubernetes"]
_ARCHS = tuple(sorted(MODELS))
_PLACEHOLDERS = ("{id}", "{port}", "{model}", "{region}", "{gpu}")


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class GpuTable:
    """`[planner.gpus.NAME]`."""

    cost_per_hour: Annotated[StrictFloat, Field(ge=0)]


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class EngineTypeTable:
    """`[planner.models.MODEL.GPU]`: one engine of MODEL on `gpus` GPUs of type GPU."""

    startup_min: Annotated[StrictFloat, Field(ge=0)] = 5.0
    gpus: Count = 1  # tensor parallel
    arch: Annotated[StrictStr, one_of(_ARCHS)] | None = None  # default: the model's name
    max_num_seqs: Count = 256
    tpot_slo_ms: Positive = 50.0
    # Prompt tokens per second one engine takes at the SLO; 0: from the performance model.
    tokens_per_s: Annotated[StrictFloat, Field(ge=0)] = 0.0
    # The traffic's mean request, which the capacity at the SLO depends on.
    prompt_tokens: Annotated[StrictFloat, Field(ge=0)] = 1000.0
    output_tokens: Annotated[StrictFloat, Field(ge=1)] = 200.0


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class ActuatorConfig:
    """`[planner.actuator]`: what applies a plan, and its settings."""

    kind: ActuatorKind = "dry-run"
    # sim: how long a new engine takes to join (simulated start-up, on the wall clock).
    startup_s: Annotated[StrictFloat, Field(ge=0)] = 0.0
    # process: the engine's command line, {id} {port} {model} {region} {gpu} filled in.
    command: StrictStr = ""
    host: StrictStr = "127.0.0.1"
    health_path: StrictStr = "/health"
    start_timeout_s: Positive = 120.0
    stop_timeout_s: Positive = 10.0
    # kubernetes: one Deployment per (model, region, GPU type); kubeconfig "" = in-cluster.
    namespace: StrictStr = "default"
    deployment: StrictStr = "fairway-{model}-{region}-{gpu}"
    kubeconfig: StrictStr = ""
    context: StrictStr = ""

    @model_validator(mode="after")
    def _kind_has_what_it_needs(self) -> Self:
        problems: list[Problem] = []
        if self.kind == "process":
            if not self.command.strip():
                problems.append((("command",), self.command, "is required for kind 'process'"))
            elif "{port}" not in self.command:
                why = "must contain {port}: the engine must listen where it is told"
                problems.append((("command",), self.command, why))
        if not self.health_path.startswith("/"):
            problems.append((("health_path",), self.health_path, "must start with '/'"))
        if self.kind == "kubernetes" and not self.namespace:
            problems.append((("namespace",), self.namespace, "must not be empty"))
        for name, template in (("command", self.command), ("deployment", self.deployment)):
            try:
                template.format(**{p.strip("{}"): "x" for p in _PLACEHOLDERS})
            except (KeyError, IndexError, ValueError):
                why = f"may name only {', '.join(_PLACEHOLDERS)}"
                problems.append(((name,), template, why))
        report(problems)
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class PlannerConfig:
    """`[planner]`: forecast-driven scaling of the engines (SageServe)."""

    enabled: StrictBool = False
    interval_s: Positive = 60.0  # how often the plan is remade
    slot_minutes: Count = 5
    slots: Count = 12  # the horizon, in slots
    history_minutes: Count = 360  # demand read back for the forecast
    quantile: Annotated[StrictFloat, Field(ge=0.5, lt=1)] = 0.95
    headroom: Annotated[StrictFloat, Field(ge=0)] = 0.2
    solver: Literal["auto", "cbc", "highs"] = "auto"
    time_limit_s: Positive = 10.0
    min_lifetime_s: Annotated[StrictFloat, Field(ge=0)] = 600.0  # no scale-down while younger
    drain_deadline_s: Annotated[StrictFloat, Field(ge=0)] = 300.0
    batch_deadline_min: Positive = 60.0  # batch demand may be served this much later
    retry_after_s: Annotated[StrictFloat, Field(ge=0)] = 300.0  # after a failed start there
    # Demos and tests: the gateway's demand minutes and the planner's clock (engine ages,
    # min_lifetime_s, retry_after_s, slots) run this many times faster than the wall clock.
    clock_speed: Positive = 1.0
    regions: tuple[StrictStr, ...] = ()  # default: the regions of [engines]
    gpus: dict[Name, GpuTable] = Field(default_factory=dict)
    models: dict[Name, dict[Name, EngineTypeTable]] = Field(default_factory=dict)
    quotas: dict[Name, dict[Name, Natural]] = Field(default_factory=dict)  # region -> GPU -> n
    min_engines: dict[Name, dict[Name, Natural]] = Field(default_factory=dict)  # region -> model
    actuator: ActuatorConfig = ActuatorConfig()

    @model_validator(mode="after")
    def _entries_agree(self) -> Self:
        problems: list[Problem] = []
        if self.enabled and not self.models:
            problems.append((("models",), {}, "needs at least one engine type when enabled"))
        for model, types in self.models.items():
            for gpu, t in types.items():
                where = ("models", model, gpu)
                if gpu not in self.gpus:
                    why = f": GPU type {gpu!r} has no [planner.gpus.{gpu}] entry"
                    problems.append((where, gpu, why))
                if t.tokens_per_s == 0 or self.actuator.kind == "sim":
                    if gpu not in GPUS:
                        why = (f": GPU type {gpu!r} is no performance-model preset "
                               f"({', '.join(sorted(GPUS))}); give tokens_per_s")  # fmt: skip
                        if self.actuator.kind == "sim":
                            why = f": a sim engine needs a preset GPU ({', '.join(sorted(GPUS))})"
                        problems.append((where, gpu, why))
                    if t.arch is None and model not in MODELS:
                        why = f"must be one of {list(_ARCHS)} when {model!r} is no preset"
                        problems.append(((*where, "arch"), model, why))
        for region, gpus in self.quotas.items():
            for gpu in gpus:
                if gpu not in self.gpus:
                    problems.append((("quotas", region, gpu), gpu, "names an unknown GPU type"))
        for region, models in self.min_engines.items():
            for model in models:
                if model not in self.models:
                    why = "names a model with no [planner.models] entry"
                    problems.append((("min_engines", region, model), model, why))
        if not problems:
            for model, types in self.models.items():
                for gpu, t in types.items():
                    try:
                        _engine_type(model, gpu, t)
                    except ValueError as exc:
                        problems.append((("models", model, gpu), gpu, f": {exc}"))
        report(problems)
        return self

    def engine_types(self) -> tuple[EngineType, ...]:
        """Every engine type, its capacity at the SLO from the performance model unless given."""
        return tuple(
            _engine_type(m, g, t) for m, types in self.models.items() for g, t in types.items()
        )

    def arch_of(self, model: str, gpu: str) -> str:
        return self.models[model][gpu].arch or model

    def settings(self, regions: tuple[str, ...]) -> Settings:
        """The planner's values; `regions` stand in for an empty `regions` list."""
        from planner.controller import Settings

        named = self.regions or regions
        every = tuple(dict.fromkeys((*named, *self.quotas, *self.min_engines)))
        return Settings(
            regions=every,
            gpus=tuple(GpuType(name, g.cost_per_hour) for name, g in self.gpus.items()),
            engines=self.engine_types(),
            slot_minutes=self.slot_minutes, slots=self.slots,
            history_minutes=self.history_minutes, quantile=self.quantile,
            headroom=self.headroom, solver=self.solver, time_limit_s=self.time_limit_s,
            min_lifetime_s=self.min_lifetime_s, drain_deadline_s=self.drain_deadline_s,
            batch_deadline_min=self.batch_deadline_min, retry_after_s=self.retry_after_s,
            quotas={(r, g): n for r, gs in self.quotas.items() for g, n in gs.items()},
            min_engines={(m, r): n for r, ms in self.min_engines.items() for m, n in ms.items()},
        )  # fmt: skip


def _engine_type(model: str, gpu: str, t: EngineTypeTable) -> EngineType:
    if t.tokens_per_s > 0:
        return EngineType(model, gpu, t.gpus, t.tokens_per_s, t.startup_min)
    # planner.capacity.engine_type's computation, with this type's max_num_seqs.
    perf = PerfModel.named(gpu, t.arch or model, t.gpus)
    shape = RequestShape(t.prompt_tokens, t.output_tokens)
    cap = capacity_at_slo(perf, shape, t.tpot_slo_ms / 1000, t.max_num_seqs)
    if cap.batch == 0:
        raise ValueError(
            f"cannot meet a {t.tpot_slo_ms:g} ms TPOT SLO on {t.gpus} x {gpu} "
            f"(KV room for {perf.kv_capacity_tokens} tokens)"
        )
    return EngineType(model, gpu, t.gpus, cap.prompt_tokens_per_s, t.startup_min)


# What the planner imports beyond the gateway's own dependencies (the `planner` extra).
PLANNER_MODULES = ("numpy", "statsmodels", "threadpoolctl", "pulp")


def missing_extra(actuator: str | None = None) -> str | None:
    """Why the planner cannot run here, or None: a module of the `planner` extra (and the
    Kubernetes client for that actuator) that is not installed."""
    need = (*PLANNER_MODULES, *(("kubernetes_asyncio",) if actuator == "kubernetes" else ()))
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"the planner needs {', '.join(missing)}, not installed here: "
            "pip install 'fairway-llm[planner]'")  # fmt: skip
