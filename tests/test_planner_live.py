"""The planner live: `fairway serve` with the planner and the `sim` actuator under locust's
compressed day (loadtest/planner_day.py), as benchmarks/planner_live.py runs it, made short.

The day here lasts 60 s of wall time and the gateway's clock runs 180 times faster than the
wall clock (`[planner] clock_speed`: a demand minute every third of a second), so the planner
sees three hours of demand rise to the peak and fall back: enough minutes for its ARIMA fits
(an hour at least), and some twenty requests a minute at the peak. The load is real (locust's
streaming chats through the gateway's HTTP port), and so are the fleet changes (the planner's
starts and drains).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.planner_live import Params, run, summary
from loadtest.day import Day, diurnal
from planner.workload import WorkloadConfig
from planner.workload import diurnal as workload_diurnal


def test_the_locust_day_is_the_workload_generators_curve() -> None:
    cfg = WorkloadConfig()
    hours = np.linspace(0, 24, 97)
    ours = [diurnal(float(h), cfg.peak_hour, cfg.trough, cfg.sharpness) for h in hours]
    np.testing.assert_allclose(ours, workload_diurnal(cfg, hours), rtol=1e-12)
    assert Day().peak_hour == cfg.peak_hour and Day().trough == cfg.trough
    assert Day().sharpness == cfg.sharpness


def test_a_day_maps_run_time_onto_hours_and_users() -> None:
    day = Day(seconds=240, peak_users=20, start_hour=6)
    assert day.hour(0) == 6 and day.hour(80) == pytest.approx(14) and day.hour(180) == 0
    assert day.users(80) == 20  # the peak
    assert day.users(200) == 4  # 02:00: the trough, 0.2 of the peak
    assert min(day.users(t) for t in range(240)) >= 1
    assert math.isclose(day.share(80), 1.0)
    with pytest.raises(ValueError, match="FAIRWAY_DAY_SECONDS"):
        Day(seconds=0)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_engines_follow_a_compressed_day_with_no_failed_request(tmp_path: Path) -> None:
    p = Params(day_s=60.0, peak_users=32, cycle_s=0.5, clock_speed=180.0, peak_engines=4.0,
               interval_s=1.0, startup_s=1.0, lifetime_s=4.0, history_minutes=60, quota=12,
               sample_s=1.0)  # fmt: skip
    r = run(p, tmp_path)
    m = summary(r)
    assert m["failures"] == 0, m["errors"]
    assert m["requests"] > 1000
    assert m["in_flight_after"] == 0  # nothing left counted as busy on an engine or a tenant
    assert r.planner_runs >= 20
    assert r.wall_s < p.day_s + 35  # the shape ended the run after one day
    # Engines follow demand: one at dawn, several at the peak, fewer again by night.
    assert m["engines_start"] == 1
    assert m["engines_at_peak"] >= 3
    assert m["engines_end"] < m["engines_at_peak"]
    assert m["corr_users"] > 0.5, r.samples
