"""The planner benchmark's choice of oracle and its command line (benchmarks/planner.py)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from benchmarks.planner_oracle import oracle_candidates, pick_oracle
from benchmarks.planner_report import _latency, _plan_variants


def _fig(gpu_hours: float, slo: float) -> dict[str, Any]:
    return {"gpu_hours": gpu_hours, "slo_attainment": slo, "scale_ups": 3, "batch_missed": 0}


def test_the_oracle_is_the_cheapest_candidate_at_reactive_slo() -> None:
    results = {
        "reactive": _fig(100.0, 0.99),
        "oracle@2:0.18": _fig(70.0, 0.985),  # cheapest, but below reactive's SLO
        "oracle@1:0.06": _fig(80.0, 0.99),
        "oracle@1:0.12": _fig(85.0, 0.995),
    }
    out = pick_oracle(results, ((2, 0.18), (1, 0.06), (1, 0.12)))
    assert results["oracle"]["gpu_hours"] == 80.0
    assert not any(k.startswith("oracle@") for k in results)
    assert (out["oracle_smooth_min"], out["oracle_headroom"]) == (1, 0.06)
    assert [(v["smooth_min"], v["headroom"]) for v in out["oracle_variants"]] == [
        (2, 0.18),
        (1, 0.06),
        (1, 0.12),
    ]


def test_without_a_candidate_at_reactive_slo_the_best_served_is_the_oracle() -> None:
    results = {
        "reactive": _fig(100.0, 0.999),
        "oracle@2:0.18": _fig(70.0, 0.98),
        "oracle@1:0.12": _fig(85.0, 0.99),
    }
    out = pick_oracle(results, ((2, 0.18), (1, 0.12)))
    assert (out["oracle_smooth_min"], out["oracle_headroom"]) == (1, 0.12)
    # Without reactive the cheapest is chosen; without candidates nothing changes.
    results = {"oracle@2:0.18": _fig(70.0, 0.98), "oracle@1:0.12": _fig(85.0, 0.99)}
    assert pick_oracle(results, ((2, 0.18), (1, 0.12)))["oracle_headroom"] == 0.18
    assert pick_oracle({"reactive": _fig(1.0, 1.0)}, ((1, 0.1),)) == {}


def test_oracle_candidates_parse_and_refuse_bad_pairs() -> None:
    assert oracle_candidates("2:0.18,1:0.06") == ((2, 0.18), (1, 0.06))
    for bad in ("2", "0:0.1", "1:-0.1", "1:nan", "x:0.1", "1:inf", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="W:H"):
            oracle_candidates(bad)


def test_a_tuning_run_is_compared_with_reactive_scaling_of_its_own_week() -> None:
    run = {"slot_minutes": 5, "headroom": 0.15, "override": "o", "policy": "lt-ua"}
    run |= {"gpu_hours": 75.0, "slo_attainment": 0.99, "worst_day": 2, "worst_day_slo": 0.98}
    own = run | {"seed": 1, "reactive_gpu_hours": 150.0, "reactive_slo": 0.995}
    page = {"gpu_hours": 100.0, "slo_attainment": 0.98}
    lines = _plan_variants({"setting": "s", "reading": "r", "runs": [run, own]}, page)
    rows = [x for x in lines if x.startswith("| ") and "lt-ua" in x]
    assert "-25.0%" in rows[0] and "+1.00 points" in rows[0] and rows[0].startswith("| - |")
    assert "-50.0%" in rows[1] and "-0.50 points" in rows[1] and rows[1].startswith("| 1 |")


def test_each_models_p95_latencies_are_reported_against_its_ttft_slo() -> None:
    per = {"m": {"p95_ttft_s": 1.234, "p95_e2e_s": 9.87}}
    pol = {"reactive": {"per_model": per}, "lt-ua": {"per_model": per}, "no-figures": {}}
    lines = _latency(pol, {"m": {"ttft_s": 3.8, "tpot_s": 0.05}})
    assert "| model | TTFT SLO | reactive TTFT / e2e | lt-ua TTFT / e2e |" in lines
    assert "| m | 3.8 | 1.23 / 9.9 | 1.23 / 9.9 |" in lines
    assert _latency({"reactive": {}}, {}) == []
