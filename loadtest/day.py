"""A day of demand compressed into minutes: the share of the peak rate at each moment of a run.

The curve is planner/workload.py's `diurnal`, restated here because `loadtest/` imports
nothing of Fairway (tests/test_planner_live.py checks that the two agree): a raised cosine
with its peak at `peak_hour`, lifted to `trough` and sharpened by `sharpness`, so that the
working day is busier than a plain sine would make it. `Day` maps run time onto the hour of
the day: a whole day lasts `seconds` of wall time, starting at `start_hour`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


def diurnal(
    hour: float, peak_hour: float = 14.0, trough: float = 0.2, sharpness: float = 2.0
) -> float:
    """Share of the peak rate at a local hour (0 to 24): `trough` at night, 1 at `peak_hour`."""
    wave = (1 + math.cos(2 * math.pi * (hour - peak_hour) / 24)) / 2
    return trough + (1 - trough) * wave**sharpness


@dataclass(frozen=True, slots=True)
class Day:
    """One day in `seconds` of wall time; `peak_users` locust users at its peak."""

    seconds: float = 480.0
    peak_users: int = 16
    start_hour: float = 0.0
    peak_hour: float = 14.0
    trough: float = 0.2
    sharpness: float = 2.0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"FAIRWAY_DAY_SECONDS must be > 0, got {self.seconds}")
        if self.peak_users < 1:
            raise ValueError(f"FAIRWAY_PEAK_USERS must be >= 1, got {self.peak_users}")
        if not 0 <= self.trough <= 1:
            raise ValueError(f"FAIRWAY_TROUGH must be in [0, 1], got {self.trough}")

    @classmethod
    def from_env(cls) -> Day:
        """FAIRWAY_DAY_SECONDS, FAIRWAY_PEAK_USERS, FAIRWAY_START_HOUR, FAIRWAY_PEAK_HOUR,
        FAIRWAY_TROUGH and FAIRWAY_SHARPNESS, each defaulting to the field's default."""
        env = os.environ.get
        d = cls()
        return cls(
            seconds=float(env("FAIRWAY_DAY_SECONDS", d.seconds)),
            peak_users=int(env("FAIRWAY_PEAK_USERS", d.peak_users)),
            start_hour=float(env("FAIRWAY_START_HOUR", d.start_hour)),
            peak_hour=float(env("FAIRWAY_PEAK_HOUR", d.peak_hour)),
            trough=float(env("FAIRWAY_TROUGH", d.trough)),
            sharpness=float(env("FAIRWAY_SHARPNESS", d.sharpness)),
        )

    def hour(self, t: float) -> float:
        """The hour of the day (0 to 24) `t` seconds into the run."""
        return (self.start_hour + 24 * t / self.seconds) % 24

    def share(self, t: float) -> float:
        """Share of the peak rate `t` seconds into the run."""
        return diurnal(self.hour(t), self.peak_hour, self.trough, self.sharpness)

    def users(self, t: float) -> int:
        """Locust users `t` seconds into the run: at least one, so the night is never silent."""
        return max(1, round(self.peak_users * self.share(t)))
