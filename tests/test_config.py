"""config.toml validation names the key and the value, and stops start-up."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.cli import main
from gateway.config import ConfigError, EngineConfig, diff_engines, load, parse
from gateway.http.auth import digest
from tests.conftest import ACME, MODEL, config_dict

ROOT = Path(__file__).resolve().parent.parent
# A model name with dots is a quoted TOML key.
ENGINE = f'engines.us-east."{MODEL}"[0]'


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(data)
    return exc.value.errors


def test_shipped_config_is_valid() -> None:
    cfg = load(ROOT / "config.toml")
    assert len({e.region for e in cfg.engines}) >= 2
    assert len(cfg.models) >= 2
    assert len(cfg.tenants) >= 3
    assert all(e.kind == "sim" for e in cfg.engines)
    assert cfg.server.port == 8080
    assert cfg.fairness.policy == "wsc" and cfg.admin.key_digests
    assert any(t.tokens_per_minute for t in cfg.tenants.values())
    assert all(e.max_kv_tokens > 0 for e in cfg.engines)  # from the perf model


def test_negative_weight_names_key_and_value() -> None:
    data = config_dict()
    data["tenants"]["acme"]["weight"] = -1
    assert "tenants.acme.weight must be > 0, got -1" in errors_of(data)


def test_a_positive_setting_must_be_finite() -> None:
    # TOML's inf and nan are floats; an infinite clock speed or timeout is a typo, not a wish.
    data = config_dict()
    data["planner"] = {"clock_speed": float("inf")}
    data["server"] = {**data.get("server", {}), "body_timeout_s": float("nan")}
    errors = errors_of(data)
    assert "planner.clock_speed must be a finite number, got inf" in errors
    assert "server.body_timeout_s must be a finite number, got nan" in errors


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["server"].update(port="80"), "server.port must be int, got '80'"),
        (lambda d: d["server"].update(port=70000), "server.port must be <= 65535, got 70000"),
        (lambda d: d["server"].update(prot=1), "server.prot is not a known setting"),
        (lambda d: d["server"].update(max_attempts=0), "server.max_attempts must be >= 1, got 0"),
        (lambda d: d["sim"].update(time_scale=0), "sim.time_scale must be > 0, got 0"),
        (lambda d: d["tenants"]["acme"].update(weight=True),
         "tenants.acme.weight must be int or float, got True"),
        (lambda d: d["tenants"]["acme"]["keys"][0].update(sha256="abc"),
         "tenants.acme.keys[0].sha256 must be 64 hex digits (a SHA-256 digest)"),
        (lambda d: d["tenants"]["acme"]["keys"][0].update(app="nope"),
         "tenants.acme.keys[0].app names an unknown application 'nope'"),
        (lambda d: d["tenants"]["globex"]["keys"][0].update(
            sha256=d["tenants"]["acme"]["keys"][0]["sha256"]),
         "tenants.globex.keys[0].sha256 is also a key of tenants.acme.keys[0]"),
        (lambda d: d["engines"]["us-east"][MODEL][0].update(kind="tgi"),
         f"{ENGINE}.kind must be 'sim' or 'vllm', got 'tgi'"),
        (lambda d: d["engines"]["us-east"][MODEL][0].update(kind="vllm"),
         f"{ENGINE}.url must be an http(s) URL for a vllm engine, got ''"),
        (lambda d: d["engines"]["us-east"][MODEL][0].update(gpu="V100"),
         f"{ENGINE}.gpu must be one of ['A100', 'H100', 'H200'], got 'V100'"),
        (lambda d: d["engines"]["us-east"][MODEL][1].update(id="us-east/llama-3.1-8b/0"),
         "engines: id 'us-east/llama-3.1-8b/0' is used more than once"),
        (lambda d: d["engines"]["us-east"][MODEL][0].update(api_key_env="FAIRWAY_NO_SUCH_VAR"),
         f"{ENGINE}.api_key_env: environment variable FAIRWAY_NO_SUCH_VAR "
         "is not set"),
        (lambda d: d.update(engines={}), "engines: at least one engine is needed"),
        (lambda d: d["logging"].update(level="loud"),
         "logging.level must be 'debug', 'info', 'warning' or 'error', got 'loud'"),
        (lambda d: d.update(fairness={"policy": "lottery"}),
         "fairness.policy must be one of ['fcfs', 'rpm', 'vtc', 'wsc'], got 'lottery'"),
        (lambda d: d.update(fairness={"queue_timeout_s": 0}),
         "fairness.queue_timeout_s must be > 0, got 0"),
        (lambda d: d.update(fairness={"max_queue": 3}),
         "fairness.max_queue is not a known setting"),
        (lambda d: d.update(state={"backend": "etcd"}),
         "state.backend must be 'memory' or 'redis', got 'etcd'"),
        (lambda d: d.update(state={"redis_url": "localhost:6379"}),
         "state.redis_url must be a redis:// URL, got 'localhost:6379'"),
        (lambda d: d.update(admin={"keys": [{"sha256": "xyz"}]}),
         "admin.keys[0].sha256 must be 64 hex digits (a SHA-256 digest)"),
        (lambda d: d.update(admin={"keys": [{"sha256": digest(ACME)}]}),
         "admin.keys[0].sha256 is also a key of tenants.acme.keys[0]"),
        (lambda d: d["tenants"]["acme"].update(tokens_per_minute=-5),
         "tenants.acme.tokens_per_minute must be >= 0, got -5"),
        (lambda d: d["tenants"]["acme"]["apps"]["chat"].update(calls_per_interaction=0),
         "tenants.acme.apps.chat.calls_per_interaction must be >= 1, got 0"),
        (lambda d: d["engines"]["us-east"][MODEL][0].update(max_running=0),
         f"{ENGINE}.max_running must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_validation_errors(mutate: Any, expected: str) -> None:
    data = copy.deepcopy(config_dict())
    mutate(data)
    assert expected in errors_of(data)


def test_all_errors_are_reported_at_once() -> None:
    data = config_dict()
    data["tenants"]["acme"]["weight"] = 0
    data["server"]["port"] = -5
    assert len(errors_of(data)) == 2


def test_errors_in_nested_tables_come_together_in_file_order() -> None:
    data = config_dict()
    data["engines"]["us-east"][MODEL][1].update(tp=0, gpus=2)
    data["tenants"]["acme"]["apps"]["chat"]["expected_prompt_tokens"] = "1k"
    data["tenants"]["globex"]["keys"].append({"sha256": "ab" * 32, "app": "chat", "note": "x"})
    data["tenants"]["bad tenant"] = {"keys": 3}
    data["admin"] = {"keys": [{}]}
    data["typo"] = {}
    assert errors_of(data) == [
        "tenants.acme.apps.chat.expected_prompt_tokens must be int, got '1k'",
        "tenants.globex.keys[1].note is not a known setting",
        'tenants."bad tenant" is not a valid name (letters, digits, . _ : / -)',
        'tenants."bad tenant".keys must be list, got 3',
        f"{ENGINE[:-3]}[1].tp must be >= 1, got 0",
        f"{ENGINE[:-3]}[1].gpus is not a known setting",
        "admin.keys[0].sha256 is required",
        "typo is not a known setting",
    ]


def test_checks_across_entries_report_every_problem() -> None:
    data = config_dict()
    chat = data["tenants"]["acme"]["keys"][0]
    data["tenants"]["acme"]["keys"] += [{**chat, "app": "nope"}, {**chat, "app": "nah"}]
    assert errors_of(data) == [
        "tenants.acme.keys[1].app names an unknown application 'nope'",
        "tenants.acme.keys[2].app names an unknown application 'nah'",
    ]
    data = config_dict()
    data["tenants"]["acme"]["keys"].append(dict(data["tenants"]["acme"]["keys"][0]))
    data["engines"]["eu-west"]["mistral-7b"] = [{"id": "us-east/mistral-7b/0"}]
    assert errors_of(data) == [
        "tenants.acme.keys[1].sha256 is also a key of tenants.acme.keys[0]",
        "engines: id 'us-east/mistral-7b/0' is used more than once",
    ]


def test_derived_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAIRWAY_TEST_ENGINE_KEY", "from-env")
    data = config_dict({"r": {MODEL: [
        {"kind": "vllm", "url": "http://x:8000/", "api_key_env": "FAIRWAY_TEST_ENGINE_KEY"},
        {"kind": "sim", "max_num_seqs": 64, "id": "mine"},
    ]}})  # fmt: skip
    acme = data["tenants"]["acme"]
    acme.update(tokens_per_minute=600)
    acme["apps"]["chat"]["tokens_per_minute"] = 60
    acme["keys"][0].pop("app")
    acme["keys"][0]["sha256"] = acme["keys"][0]["sha256"].upper()
    data["tenants"]["globex"]["apps"] = {}
    data["tenants"]["globex"]["keys"][0].pop("app")
    data["sim"]["seed"] = -1
    data["logging"]["level"] = "DEBUG"
    cfg = parse(data)
    vllm, sim = cfg.engines
    assert (vllm.id, vllm.url, vllm.api_key, vllm.max_running, vllm.max_kv_tokens) == (
        f"r/{MODEL}/0", "http://x:8000", "from-env", 256, 0)  # fmt: skip
    assert (sim.id, sim.arch, sim.max_running, sim.api_key) == ("mine", MODEL, 64, None)
    assert sim.max_kv_tokens > 0  # the performance model's KV capacity
    tenant = cfg.tenants["acme"]
    assert tenant.burst_tokens == 600 and tenant.apps["chat"].burst_tokens == 60
    assert tenant.key_digests == {digest(ACME): "chat"}  # lower case; the first application
    assert list(cfg.tenants["globex"].key_digests.values()) == ["default"]
    assert (cfg.sim.seed, cfg.log_level, cfg.logging.level) == (None, "debug", "debug")


def test_values_are_frozen_and_keyword_only() -> None:
    engine = parse(config_dict()).engines[0]
    with pytest.raises(AttributeError):
        engine.tp = 2  # type: ignore[misc]
    with pytest.raises(ValidationError):
        EngineConfig("x", "r", MODEL, "sim")  # type: ignore[misc]
    assert replace(engine, url="http://y").url == "http://y"


def test_diff_engines() -> None:
    old = parse(config_dict())
    engines = config_dict()["engines"]
    engines["us-east"][MODEL][1]["max_running"] = 8  # changed
    del engines["eu-west"]  # removed
    engines["ap-south"] = {MODEL: [{"kind": "sim"}]}  # added
    new = parse(config_dict(engines))
    diff = diff_engines(old, new)
    added, removed, changed = diff
    assert [e.id for e in added] == [f"ap-south/{MODEL}/0"]
    assert [e.id for e in removed] == [f"eu-west/{MODEL}/0"]
    assert [(e.id, e.max_running) for e in changed] == [(f"us-east/{MODEL}/1", 8)]
    assert diff.changed == changed
    assert diff_engines(new, new) == ([], [], [])


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "config.toml")]) == 0
    assert "ok: 3 tenants" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "config.toml").read_text().replace("weight = 2.0", "weight = -1"))
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "tenants.acme.weight must be > 0, got -1" in capsys.readouterr().err
    (tmp_path / "broken.toml").write_text("[server\n")
    assert main(["check-config", "--config", str(tmp_path / "broken.toml")]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert main(["check-config", "--config", str(tmp_path / "missing.toml")]) == 2


def test_check_config_takes_a_positional_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = str(ROOT / "config.toml")
    assert main(["check-config", shipped]) == 0
    assert f"{shipped}: ok: 3 tenants" in capsys.readouterr().out
    assert main(["check-config", shipped, "--config", shipped]) == 0  # the same file twice
    capsys.readouterr()
    other = tmp_path / "other.toml"
    other.write_text((ROOT / "config.toml").read_text())
    assert main(["check-config", shipped, "--config", str(other)]) == 2
    assert "two config files given" in capsys.readouterr().err


def test_serve_refuses_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "config.toml").read_text().replace('gpu = "A100"', 'gpu = "K80"', 1))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "gpu must be one of" in proc.stderr


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ({"policy": "random"}, "routing.policy must be one of ['predicted-latency', "
         "'round-robin', 'jsq', 'least-tokens', 'power-of-two', 'least-outstanding'], "
         "got 'random'"),
        ({"region_threshold": 1.5}, "routing.region_threshold must be <= 1, got 1.5"),
        ({"region_threshold": 0}, "routing.region_threshold must be > 0, got 0"),
        ({"preferred_regions": "us-east"},
         "routing.preferred_regions must be list, got 'us-east'"),
        ({"preferred_regions": [1]}, "routing.preferred_regions[0] must be str, got 1"),
        ({"feature_log_keep": -1}, "routing.feature_log_keep must be >= 0, got -1"),
        ({"feature_log_max_bytes": 10}, "routing.feature_log_max_bytes must be >= 1024, got 10"),
        ({"model": "x"}, "routing.model is not a known setting"),
    ],
)  # fmt: skip
def test_routing_errors_name_the_key(routing: dict[str, Any], expected: str) -> None:
    data = config_dict()
    data["routing"] = routing
    assert expected in errors_of(data)


def test_routing_defaults_and_vllm_perf_fields() -> None:
    cfg = parse(config_dict())
    assert cfg.routing.policy == "predicted-latency" and cfg.routing.model_path == ""
    data = config_dict({"r": {MODEL: [{"kind": "vllm", "url": "http://x", "arch": "gpt-9"}]}})
    assert errors_of(data)[0].startswith(f'engines.r."{MODEL}"[0].arch must be one of')
    ok = config_dict({"r": {MODEL: [{"kind": "vllm", "url": "http://x", "gpu": "A100", "tp": 2}]}})
    engine = parse(ok).engines[0]
    assert (engine.gpu, engine.arch, engine.tp) == ("A100", MODEL, 2)
