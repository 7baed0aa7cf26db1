"""The planner's week-long workload: determinism, shapes in time, real sizes, aggregates, files."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engines.perf_model import MODELS
from planner.workload import RealTrace, generate, load, load_real, save
from planner.workload_trace import CLASSES, Region, Trace, WorkloadConfig

SMALL = WorkloadConfig(days=7, seed=0, peak_rps=0.05)  # about 30,000 requests


@pytest.fixture(scope="module")
def real() -> RealTrace:
    return load_real()


@pytest.fixture(scope="module")
def week(real: RealTrace) -> Trace:
    return generate(SMALL, real)


def test_same_seed_same_trace_other_seed_other(real: RealTrace, week: Trace) -> None:
    again = generate(SMALL, real)
    for name in ("arrival_s", "region", "model", "batch", "prompt", "output", "deadline_s"):
        assert np.array_equal(getattr(week, name), getattr(again, name)), name
    assert week.bursts == again.bursts
    other = generate(replace(SMALL, seed=1), real)
    assert len(other) != len(week) or not np.array_equal(other.arrival_s, week.arrival_s)


def test_four_known_models_three_regions_in_arrival_order(week: Trace) -> None:
    assert len(week.config.models) == 4
    assert set(week.config.models) <= set(MODELS)
    assert len(week.config.regions) == 3
    assert 20_000 < len(week) < 60_000
    assert np.all(np.diff(week.arrival_s) >= 0)
    assert week.arrival_s[0] >= 0 and week.arrival_s[-1] < 7 * 86400
    # Every (region, model) pair of the mix is served.
    for r, region in enumerate(week.config.regions):
        for m, _ in region.mix:
            i = week.config.models.index(m)
            assert np.any((week.region == r) & (week.model == i)), (region.name, m)


def test_batch_share_about_a_fifth_with_deadlines_after_arrival(week: Trace) -> None:
    assert abs(week.batch.mean() - 0.2) < 0.015
    for r in range(3):
        assert abs(week.batch[week.region == r].mean() - 0.2) < 0.03
    wait = week.deadline_s[week.batch] - week.arrival_s[week.batch]
    assert wait.min() >= 3600 - 1e-6 and wait.max() <= 24 * 3600 + 1e-6
    # Log-uniform between 1 h and 24 h: the median wait is their geometric mean.
    assert np.median(wait) / 3600 == pytest.approx(math.sqrt(24), rel=0.1)
    assert np.all(np.isinf(week.deadline_s[~week.batch]))


def _local_hours(trace: Trace, r: int) -> np.ndarray:
    return trace.arrival_s[trace.region == r] / 3600 + trace.config.regions[r].utc_offset_h


def test_diurnal_peak_at_the_local_hour_in_every_region(real: RealTrace) -> None:
    trace = generate(replace(SMALL, peak_rps=0.2, bursts_per_day=0), real)
    for r, region in enumerate(trace.config.regions):
        local_h = _local_hours(trace, r)
        weekday = (np.floor(local_h / 24) % 7) < 5  # day 0 is a Monday
        hour = local_h[weekday] % 24
        # Circular mean of the local hour of arrival: the curve is symmetric about its peak.
        angle = np.angle(np.mean(np.exp(2j * np.pi * hour / 24)))
        mean_hour = (angle * 24 / (2 * np.pi)) % 24
        assert mean_hour == pytest.approx(14.0, abs=0.3), region.name
        by_hour = np.bincount(hour.astype(np.int64), minlength=24)
        assert int(np.argmax(by_hour)) in (13, 14), region.name
        # The trough (2 a.m., local) is near `trough` times the peak.
        assert by_hour[2] / by_hour[13:15].mean() == pytest.approx(0.2, abs=0.05), region.name


def test_peaks_follow_the_time_zones(week: Trace) -> None:
    # In UTC, ap-south (UTC+5:30) peaks first, then eu-west (UTC+1), then us-east (UTC-5).
    utc_peak = {}
    for r, region in enumerate(week.config.regions):
        hour = (week.arrival_s[week.region == r] / 3600) % 24
        angle = np.angle(np.mean(np.exp(2j * np.pi * hour / 24)))
        utc_peak[region.name] = (angle * 24 / (2 * np.pi)) % 24
    assert utc_peak["ap-south"] == pytest.approx(8.5, abs=0.5)
    assert utc_peak["eu-west"] == pytest.approx(13.0, abs=0.5)
    assert utc_peak["us-east"] == pytest.approx(19.0, abs=0.5)


def test_weekend_lower_than_weekdays(real: RealTrace) -> None:
    trace = generate(replace(SMALL, bursts_per_day=0), real)
    for r, region in enumerate(trace.config.regions):
        shift = region.utc_offset_h * 3600
        day = np.floor((trace.arrival_s[trace.region == r] + shift) / 86400).astype(np.int64)
        # Only local days wholly inside the week.
        whole = [d for d in range(-1, 8) if d * 86400 - shift >= 0 and (d + 1) * 86400 - shift
                 <= 7 * 86400]  # fmt: skip
        per_day = {d: int((day == d).sum()) for d in whole}
        weekend = [n for d, n in per_day.items() if d % 7 >= 5]
        weekdays = [n for d, n in per_day.items() if d % 7 < 5]
        assert weekend and weekdays
        ratio = np.mean(weekend) / np.mean(weekdays)
        assert ratio == pytest.approx(0.6, abs=0.08), region.name


def test_sizes_follow_the_real_trace(real: RealTrace, week: Trace) -> None:
    for ours, theirs in ((week.prompt, real.prompt), (week.output, real.output)):
        for q in (25, 50, 75, 90):
            assert np.percentile(ours, q) == pytest.approx(np.percentile(theirs, q), rel=0.04), q
    # Jointly: the (weak) correlation of prompt and output lengths survives.
    ours_r = np.corrcoef(np.log(week.prompt), np.log(week.output))[0, 1]
    theirs_r = np.corrcoef(np.log(real.prompt), np.log(real.output))[0, 1]
    assert ours_r == pytest.approx(theirs_r, abs=0.03)
    limit = np.array([MODELS[m].max_model_len for m in week.config.models])[week.model]
    assert np.all(week.prompt + week.output <= limit)
    assert week.prompt.min() >= 1 and week.output.min() >= 1


def test_each_request_is_a_real_row_at_its_real_offset_in_the_minute(
    real: RealTrace, week: Trace
) -> None:
    offsets = np.round(real.t_s - 60 * np.floor(real.t_s / 60), 4)
    rows = set(zip(offsets.tolist(), real.prompt.tolist(), real.output.tolist(), strict=True))
    ours = np.round(week.arrival_s - 60 * np.floor(week.arrival_s / 60), 4)
    unclipped = week.prompt + week.output < 8192
    got = zip(ours[unclipped].tolist(), week.prompt[unclipped].tolist(),
              week.output[unclipped].tolist(), strict=True)  # fmt: skip
    missing = sum(1 for g in got if g not in rows)
    assert missing == 0


def test_sub_minute_burstiness_comes_from_the_trace(real: RealTrace) -> None:
    # At the trace's own rate and with a flat curve, counts per second within a minute are
    # over-dispersed as in the real hour; a Poisson process of the same rate is not. Where the
    # Poisson count exceeds the template minute's, two real minutes are superposed and thinned,
    # which keeps part of the excess only.
    full = real.full_minutes
    rate = float(np.searchsorted(real.t_s, full * 60.0)) / (full * 60.0)
    flat = WorkloadConfig(
        days=1, peak_rps=rate, regions=(Region("x", 0.0, 1.0, (("llama-3.1-8b", 1.0),)),),
        trough=1.0, weekend=1.0, bursts_per_day=0, noise_sigma=0.0,
    )  # fmt: skip

    def dispersion(t: np.ndarray, minutes: int) -> float:
        per_s = np.bincount(t.astype(np.int64), minlength=minutes * 60).reshape(minutes, 60)
        return float(np.mean(per_s.var(axis=1) / per_s.mean(axis=1)))

    theirs = dispersion(real.t_s[real.t_s < full * 60], full)
    ours_t = generate(flat, real).arrival_s
    ours = dispersion(ours_t, 1440)
    uniform = np.random.default_rng(0).uniform(0, 86400, ours_t.size)
    poisson = dispersion(uniform, 1440)
    assert theirs - poisson > 0.06  # the real hour is burstier than Poisson
    assert ours - poisson > 0.5 * (theirs - poisson)
    assert ours < theirs + 0.03


def test_per_minute_series_sum_to_the_requests(week: Trace) -> None:
    d = week.demand()
    cfg = week.config
    assert d.requests.shape == (4, 3, len(CLASSES), cfg.minutes)
    assert int(d.requests.sum()) == len(week)
    assert int(d.prompt_tokens.sum()) == int(week.prompt.sum())
    assert int(d.output_tokens.sum()) == int(week.output.sum())
    minute = (week.arrival_s // 60).astype(np.int64)
    for m in range(4):
        for r in range(3):
            for c in range(2):
                mine = (week.model == m) & (week.region == r) & (week.batch == bool(c))
                counts = np.bincount(minute[mine], minlength=cfg.minutes)
                prompt = np.bincount(minute[mine], week.prompt[mine], minlength=cfg.minutes)
                assert np.array_equal(d.requests[m, r, c], counts)
                assert np.array_equal(d.prompt_tokens[m, r, c], prompt.astype(np.int64))
    # The request iterator says the same as the arrays.
    reqs = list(week.requests())
    assert len(reqs) == len(week)
    first_batch = next(q for q in reqs if q.cls == "batch")
    assert first_batch.deadline_s > first_batch.arrival_s
    assert sum(q.output_tokens for q in reqs) == int(week.output.sum())


def test_bursts_multiply_their_model_and_region(real: RealTrace) -> None:
    cfg = replace(SMALL, burst_factor=(4.0, 4.0), burst_minutes=(60, 60))
    with_bursts = generate(cfg, real)
    without = generate(replace(cfg, bursts_per_day=0), real)
    assert len(with_bursts.bursts) > 5 and without.bursts == ()
    inside, baseline = 0, 0
    for b in with_bursts.bursts:
        r = [x.name for x in cfg.regions].index(b.region)
        m = cfg.models.index(b.model)
        lo, hi = b.start_min * 60, (b.start_min + b.minutes) * 60
        for trace, acc in ((with_bursts, "in"), (without, "base")):
            n = int(np.sum((trace.region == r) & (trace.model == m)
                           & (trace.arrival_s >= lo) & (trace.arrival_s < hi)))  # fmt: skip
            if acc == "in":
                inside += n
            else:
                baseline += n
    assert baseline > 100
    # Overlapping bursts compound, so a little above 4 is possible.
    assert 3.3 < inside / baseline < 5.0


def test_scale_knob_is_linear(real: RealTrace, week: Trace) -> None:
    double = generate(replace(SMALL, peak_rps=0.1), real)
    assert len(double) / len(week) == pytest.approx(2.0, rel=0.05)


def test_file_round_trip(tmp_path: Path, week: Trace) -> None:
    path = tmp_path / "week.npz"
    save(week, path)
    back = load(path)
    assert back.config == week.config and back.bursts == week.bursts
    for name in ("arrival_s", "region", "model", "batch", "prompt", "output", "deadline_s"):
        assert np.array_equal(getattr(back, name), getattr(week, name)), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_share": 1.5}, "batch_share must be in [0, 1], got 1.5"),
        ({"peak_rps": 0.0}, "peak_rps must be > 0, got 0.0"),
        ({"deadline_h": (2.0, 1.0)}, "deadline_h must be 0 < low <= high"),
        (
            {"regions": (Region("x", 0.0, 1.0, (("gpt-9", 1.0),)),)},
            "regions.x.mix must be models of",
        ),
        (
            {"regions": (Region("x", 0.0, 1.0, (("mistral-7b", 0.5),)),)},
            "regions.x.mix must be shares summing to 1, got 0.5",
        ),
    ],
)
def test_bad_config_names_the_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        replace(SMALL, **change)  # type: ignore[arg-type]


def test_cli_writes_the_file_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "w.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "planner.workload", "--out", str(out), "--days", "2",
         "--seed", "3", "--peak-rps", "0.02"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    trace = load(out)
    assert trace.config.days == 2 and trace.config.seed == 3
    lines = proc.stdout.splitlines()
    for r, region in enumerate(trace.config.regions):
        row = next(line for line in lines if line.startswith(region.name)).split()
        assert int(row[5]) == int((trace.region == r).sum())
    assert f"{len(trace)} requests over 2 days" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "planner.workload", "--out", str(out), "--days", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "days must be >= 1, got 0" in bad.stderr
