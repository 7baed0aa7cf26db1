"""The `[engines]` table of `config.toml`: engines grouped by region and by the model they
serve, flattened into one `EngineConfig` each."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import field
from typing import Annotated, Literal, Self

from pydantic import Field, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass

from engines.perf_model import GPUS, MODELS, PerfModel
from engines.vllm_launch import own_flags_in
from gateway.config.fields import TABLE, Count, Name, Natural, Problem, one_of, report

EngineKind = Literal["sim", "vllm"]
_GPUS = tuple(sorted(GPUS))
_ARCHS = tuple(sorted(MODELS))

_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class EngineTable:
    """One `[[engines.<region>.<model>]]` entry as written."""

    kind: EngineKind = "sim"
    id: StrictStr | None = None  # default: <region>/<model>/<index>
    url: StrictStr = ""
    api_key: StrictStr = ""
    api_key_env: StrictStr = ""  # read the key from this environment variable
    # Optional for vllm: given, they let the router price steps with the performance model.
    gpu: Annotated[StrictStr, one_of(_GPUS)] = "H100"
    arch: Annotated[StrictStr, one_of(_ARCHS)] | None = None  # default: the model's name
    tp: Count = 1
    port: Natural = 0
    max_num_seqs: Count = 256
    max_batched_tokens: Annotated[StrictInt, Field(ge=16)] = 2048
    max_running: Count | None = None  # default: max_num_seqs
    max_kv_tokens: Annotated[StrictInt, Field(ge=-1)] = -1  # -1: sim: modelled; vllm: no limit
    # vllm, for `fairway engine vllm` (how the engine is started, not how it is reached):
    model_path: StrictStr = ""  # a local path or a Hugging Face id; default: the model's name
    vllm_python: StrictStr = ""  # the Python that has vLLM; default: the launcher's own
    vllm_args: tuple[StrictStr, ...] = ()  # more server flags, after the launcher's own

    @model_validator(mode="after")
    def _kind_has_what_it_needs(self) -> Self:
        problems: list[Problem] = []
        url, env = self.url, self.api_key_env
        if self.kind == "vllm" and not url.startswith(("http://", "https://")):
            why = f"must be an http(s) URL for a vllm engine, got {url!r}"
            problems.append((("url",), url, why))
        if env and env not in os.environ:
            problems.append((("api_key_env",), env, f": environment variable {env} is not set"))
        # The key goes into an Authorization header: only visible ASCII, so that it can neither
        # break the header's framing nor fail to encode.
        key = os.environ.get(env, "") if env else self.api_key
        if key and not _HEADER_SAFE.fullmatch(key):
            where, shown = (("api_key_env",), env) if env else (("api_key",), "<hidden>")
            problems.append((where, shown, "must hold only visible ASCII characters"))
        launch = {"model_path": self.model_path, "vllm_python": self.vllm_python,
                  "vllm_args": self.vllm_args}  # fmt: skip
        if self.kind != "vllm":
            for name, value in launch.items():
                if value:
                    why = f"is only for a vllm engine, got kind {self.kind!r}"
                    problems.append(((name,), value, why))
        if clash := own_flags_in(self.vllm_args):
            why = f"must not set {', '.join(clash)}: the launcher takes them from the entry"
            problems.append((("vllm_args",), list(self.vllm_args), why))
        report(problems)
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class EngineConfig:
    """One engine: its `[[engines.<region>.<model>]]` entry with every default resolved."""

    id: str
    region: str
    model: str
    kind: EngineKind
    url: str = ""  # vllm: where it listens; sim: filled in when the engine starts
    api_key: str | None = None  # the engine's own upstream key, never the client's
    gpu: str = "H100"
    arch: str = ""
    tp: int = 1
    port: int = 0
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    max_running: int = 256  # the gateway's in-flight limit for this engine
    max_kv_tokens: int = 0  # in-flight prompt + expected output tokens; 0 = no limit
    # How `fairway engine vllm` starts it. Not compared: the gateway only reaches the engine,
    # so a reload that changes these alone leaves it be.
    model_path: str = field(default="", compare=False)  # resolved: the model's name if unset
    vllm_python: str = field(default="", compare=False)
    vllm_args: tuple[str, ...] = field(default=(), compare=False)


# region -> model -> entries
Engines = dict[str, dict[Name, list[EngineTable]]]


def _entries(engines: Engines) -> Iterator[tuple[str, str, int, EngineTable]]:
    for region, models in engines.items():
        for model, tables in models.items():
            for i, t in enumerate(tables):
                yield region, model, i, t


def check_engines(engines: Engines) -> Engines:
    """The checks that need an entry's place in the table, or all of them."""
    problems: list[Problem] = []
    ids: Counter[str] = Counter()
    for region, model, i, t in _entries(engines):
        ids[t.id or f"{region}/{model}/{i}"] += 1
        if t.kind == "sim" and t.arch is None and model not in MODELS:
            why = f"must be one of {list(_ARCHS)} for a sim engine, got {model!r}"
            problems.append(((region, model, i, "arch"), model, why))
    if not ids:
        problems.append(((), engines, ": at least one engine is needed"))
    for eid, n in ids.items():
        if n > 1:
            problems.append(((), eid, f": id {eid!r} is used more than once"))
    report(problems)
    return engines


def engine_configs(engines: Engines) -> tuple[EngineConfig, ...]:
    """Every entry of a valid table, in file order, with its defaults resolved."""
    return tuple(_engine(*entry) for entry in _entries(engines))


def _engine(region: str, model: str, i: int, t: EngineTable) -> EngineConfig:
    arch = t.arch or model
    kv = t.max_kv_tokens
    if kv < 0:
        kv = PerfModel.named(t.gpu, arch, t.tp).kv_capacity_tokens if t.kind == "sim" else 0
    return EngineConfig(
        id=t.id or f"{region}/{model}/{i}", region=region, model=model, kind=t.kind,
        url=t.url.rstrip("/"),
        api_key=os.environ[t.api_key_env] if t.api_key_env else t.api_key or None,
        gpu=t.gpu, arch=arch, tp=t.tp, port=t.port, max_num_seqs=t.max_num_seqs,
        max_batched_tokens=t.max_batched_tokens, max_running=t.max_running or t.max_num_seqs,
        max_kv_tokens=kv, model_path=t.model_path or model, vllm_python=t.vllm_python,
        vllm_args=t.vllm_args,
    )  # fmt: skip
