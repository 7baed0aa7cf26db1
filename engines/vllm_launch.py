"""The vLLM OpenAI server command for one engine, as `fairway engine vllm` runs it.

Pure: `build` takes the engine's values and what `PROBE` found out about the Python that has
vLLM (`read_probe`), and returns the argv and the environment; running them is the caller's.
The LeanAttention backend (engines.vllm_plugin) is chosen where that Python has the plugin:
`--attention-backend CUSTOM` on GPUs; on CPUs, where vLLM ignores CUSTOM, the plugin takes the
CPU_ATTN slot when FAIRWAY_LEAN_ATTENTION=1 and its Triton kernel runs interpreted.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from engines.vllm_plugin import TAKE_CPU_SLOT_ENV

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Flags the launcher derives from the engine's entry: given again in extra args they would
# silently part the engine from what the gateway believes about it.
OWN_FLAGS = ("--host", "--port", "--model", "--served-model-name", "--api-key")
API_KEY_ENV = "VLLM_API_KEY"  # the key goes through the environment, not into `ps` output
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_CPU_KV_CACHE_GIB = "4"  # vLLM's own default, stated so that a run does not depend on it

# Run by the vLLM Python: where it lives, whether the plugin is installed there, and whether
# torch sees a GPU. One JSON line on stdout.
PROBE = """
import importlib.metadata, importlib.util, json, os, sys
points = importlib.metadata.entry_points(group="vllm.general_plugins")
plugin = any(p.value.startswith("engines.vllm_plugin") for p in points)
plugin = plugin and importlib.util.find_spec("engines.vllm_plugin") is not None
import torch
print(json.dumps({"prefix": sys.prefix, "plugin": plugin, "gpu": torch.cuda.is_available(),
                  "iomp": os.path.exists(os.path.join(sys.prefix, "lib", "libiomp5.so"))}))
"""


@dataclass(frozen=True, slots=True)
class Runtime:
    """What `PROBE` found in the vLLM Python's environment."""

    prefix: str  # sys.prefix: the virtualenv
    plugin: bool  # the LeanAttention plugin is installed and importable there
    gpu: bool
    iomp: bool  # <prefix>/lib/libiomp5.so exists (vllm-cpu ships Intel's OpenMP)


def read_probe(stdout: str) -> Runtime:
    """The probe's last output line; ValueError if it is not what the probe prints."""
    lines = stdout.strip().splitlines()
    try:
        found = json.loads(lines[-1])
        return Runtime(str(found["prefix"]), found["plugin"] is True, found["gpu"] is True,
                       found["iomp"] is True)  # fmt: skip
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unexpected probe output: {stdout[-500:]!r}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class Engine:
    """One engine's entry, as plain values."""

    served_model: str  # the name the gateway routes by
    model: str  # what vLLM loads: a local path or a Hugging Face id
    url: str  # where the gateway reaches it: the host and port to listen on
    python: str  # the Python that has vLLM
    api_key: str | None = None
    tp: int = 1
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    extra_args: tuple[str, ...] = ()  # after the launcher's own, so that they win
    host: str | None = None  # listen here instead of the url's host (0.0.0.0 in a container)


@dataclass(frozen=True, slots=True)
class Launch:
    """The command and the variables it needs on top of the caller's environment."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """Shell-quoted `VAR=value ... command`, with the API key hidden."""
        shown = {k: "<hidden>" if k == API_KEY_ENV else v for k, v in self.env.items()}
        assigns = [f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items())]
        return " ".join([*assigns, shlex.join(self.argv)])


def own_flags_in(args: tuple[str, ...]) -> list[str]:
    """The launcher's own flags among `args` (`--port 1` and `--port=1` alike)."""
    return [a for a in args if a.split("=", 1)[0] in OWN_FLAGS]


def listen_address(url: str) -> tuple[str, int]:
    """Host and port of an engine's url; the scheme's port when it names none."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http(s)://HOST[:PORT], got {url!r}")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def build(engine: Engine, runtime: Runtime, environ: Mapping[str, str]) -> Launch:
    """The server command for `engine` on `runtime`; `environ` is the caller's environment
    (a KV cache size or an LD_PRELOAD set there is kept)."""
    clash = own_flags_in(engine.extra_args)
    if clash:
        raise ValueError(f"extra vLLM args must not set {', '.join(clash)}: the engine entry does")
    host, port = listen_address(engine.url)
    argv = [
        engine.python, "-m", SERVER_MODULE,
        "--host", engine.host or host, "--port", str(port),
        "--served-model-name", engine.served_model, "--model", engine.model,
        "--tensor-parallel-size", str(engine.tp), "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_batched_tokens),
    ]  # fmt: skip
    env: dict[str, str] = {}
    if engine.api_key:
        env[API_KEY_ENV] = engine.api_key
    if runtime.gpu:
        if runtime.plugin:
            argv += ["--attention-backend", "CUSTOM"]
    else:
        if runtime.plugin:
            # Triton has no CPU target: the kernel runs in its interpreter.
            env |= {TAKE_CPU_SLOT_ENV: "1", "TRITON_INTERPRET": "1"}
        if runtime.iomp:
            iomp = str(PurePosixPath(runtime.prefix) / "lib" / "libiomp5.so")
            preload = environ.get("LD_PRELOAD", "")
            if iomp not in preload.split(":"):
                env["LD_PRELOAD"] = f"{iomp}:{preload}" if preload else iomp
        env[KV_CACHE_ENV] = environ.get(KV_CACHE_ENV) or DEFAULT_CPU_KV_CACHE_GIB
    return Launch((*argv, *engine.extra_args), env)
