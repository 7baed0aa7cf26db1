"""The length predictor: training, the train-router CLI, fallback, hot reload, feature logging."""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from benchmarks.routing_sim import make_job
from benchmarks.routing_workload import Row, requests
from gateway.cli import main
from gateway.lengths.featurelog import NAME, FeatureLog
from gateway.lengths.features import CATEGORICAL, TARGET
from gateway.lengths.predictor import PRIOR_MEDIAN, LengthModel, LengthPredictor
from gateway.lengths.service import LengthService
from gateway.lengths.train import fit, read_logs, save, train_and_report
from tests.conftest import ACME, MODEL, GatewayFactory, config_dict


def synthetic_log(path: Path, n: int = 500, seed: int = 0) -> list[dict[str, Any]]:
    """The feature log the gateway's length service writes for `n` synthetic requests."""
    rng = random.Random(seed)
    rows = [Row(i * 0.1, rng.randint(50, 3000), rng.randint(5, 800)) for i in range(n)]
    service = LengthService(LengthPredictor(), FeatureLog(path))
    recs = []
    for i, r in enumerate(requests(rows, seed * 10_000)):
        req = make_job(str(i), r.t, r.tenant, r.app, r.body, r.output_tokens).info
        info, rec = service.annotate(req.info, req.body)
        service.finish(info, rec, r.output_tokens)
        recs.append({**rec, TARGET: r.output_tokens})
    service.close()
    return recs


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs")
    synthetic_log(path)
    return path


def test_model_beats_the_per_application_mean(logs: Path, tmp_path: Path) -> None:
    report = train_and_report([logs], tmp_path / "m.json", rounds=150, show_progress=False)
    ours, per_app = report["LightGBM"], report["per-application mean"]
    assert ours.mae < per_app.mae
    assert ours.bucket_accuracy >= per_app.bucket_accuracy
    assert 0.6 < ours.coverage <= 1.0
    model = LengthPredictor(tmp_path / "m.json").model
    assert model is not None and model.meta["test"] == 100


def test_train_router_cli_end_to_end(logs: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "model.json"
    assert main(["train-router", str(logs / NAME), "-o", str(out), "--rounds", "20"]) == 0
    text = capsys.readouterr().out
    for name in ("LightGBM", "global mean", "per-application mean", "MAE", "coverage"):
        assert name in text
    assert json.loads(out.read_text())["format"] == "fairway-length-model"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"bad": 1}\nnot json\n')
    assert main(["train-router", str(empty), "-o", str(tmp_path / "x.json")]) == 2
    assert "usable records" in capsys.readouterr().err


def test_fallback_without_a_model(tmp_path: Path) -> None:
    for path in (None, tmp_path / "missing.json"):
        p = LengthPredictor(path)
        rec = p.with_history({"tenant": "t", "app": "a", "max_tokens": None})
        assert p.predict(rec) == (PRIOR_MEDIAN, 480)
        for n in (10, 20, 30, 40, 50):
            p.observe(rec, n)
        med, up = p.predict(p.with_history({"tenant": "t", "app": "a", "max_tokens": 45}))
        assert (med, up) == (30, 45)  # the application's median, its p90 capped by max_tokens
    broken = tmp_path / "broken.json"
    broken.write_text("{not a model")
    assert LengthPredictor(broken).model is None


def test_hot_reload_when_the_file_changes(logs: Path, tmp_path: Path) -> None:
    recs = read_logs([logs])
    path = tmp_path / "model.json"
    pred = LengthPredictor(path)
    assert pred.model is None and not pred.maybe_reload()
    save(fit(recs[:250], rounds=10), path)
    assert pred.maybe_reload() and pred.model is not None
    first = pred.model
    assert not pred.maybe_reload()  # unchanged file: not parsed again
    save(fit(recs[250:], rounds=15), path)
    os.utime(path, ns=(1, 1))  # a different stamp even within one clock tick
    assert pred.maybe_reload() and pred.model is not first
    path.write_text("garbage")  # a broken new version keeps the last good model
    assert not pred.maybe_reload() and pred.model is not None


async def test_gateway_logs_features_rotates_and_reloads(
    start_gateway: GatewayFactory, logs: Path, tmp_path: Path
) -> None:
    model_path = tmp_path / "model.json"
    cfg = config_dict()
    cfg["routing"] = {
        "feature_log_dir": str(tmp_path / "flog"),
        "feature_log_max_bytes": 2048,
        "feature_log_keep": 2,
        "model_path": str(model_path),
        "reload_interval_s": 0.05,
    }
    server, gw = await start_gateway(cfg)
    assert gw.lengths is not None and gw.lengths.predictor.model is None  # starts without one
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=ACME, max_retries=0)
    sent = []
    for i in range(8):
        n = 3 + i
        resp = await client.chat.completions.create(
            model=MODEL, max_tokens=n, stream=i % 2 == 0, stream_options=None,
            messages=[{"role": "system", "content": "Be terse."},
                      {"role": "user", "content": f"Question {i}? Answer briefly."}],
            extra_body={"ignore_eos": True}, temperature=0.5,
            extra_headers={"X-Fairway-Regions": "eu-west, us-east"},
        )  # fmt: skip
        if i % 2 == 0:
            async for _ in resp:  # type: ignore[union-attr]
                pass
        sent.append(n)
    files = sorted(p.name for p in (tmp_path / "flog").iterdir())
    assert files == [NAME, f"{NAME}.1", f"{NAME}.2"]  # rotated, only `keep` old ones kept
    lines = [orjson.loads(x) for x in (tmp_path / "flog" / NAME).read_bytes().splitlines()]
    last = lines[-1]
    assert last[TARGET] == sent[-1] and last["max_tokens"] == sent[-1]
    assert last["asks_brief"] == 1 and last["n_system"] == 1 and last["temperature"] == 0.5
    assert last["app"] == "chat" and last["predicted"] <= sent[-1] and last["engine"]
    assert last["app_recent_n"] >= 1
    # A model appears: the gateway picks it up without a restart.
    save(fit(read_logs([logs]), rounds=10), model_path)
    for _ in range(100):
        if gw.lengths.predictor.model is not None:
            break
        await asyncio.sleep(0.05)
    assert gw.lengths.predictor.model is not None
    resp = await client.chat.completions.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert resp.usage is not None and resp.usage.completion_tokens <= 5


def test_a_failing_model_falls_back_to_history() -> None:
    p = LengthPredictor()
    p.model = LengthModel(None, None, {c: {} for c in CATEGORICAL}, 0.9)  # predict() raises
    assert p.predict(p.with_history({"tenant": "t", "app": "a"})) == (PRIOR_MEDIAN, 480)
