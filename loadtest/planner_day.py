"""Locust shape for the planner's live test: a day of chat traffic compressed into minutes.

    FAIRWAY_DAY_SECONDS=480 FAIRWAY_PEAK_USERS=16 FAIRWAY_CYCLE_S=1 \\
        .venv/bin/locust -f loadtest/planner_day.py --headless -H http://127.0.0.1:8080 \\
        --stop-timeout 30

`DayShape` sets the number of users to follow `loadtest/day.py`'s diurnal curve: a whole day
in FAIRWAY_DAY_SECONDS of wall time (midnight to midnight by default), FAIRWAY_PEAK_USERS at
its peak, and stops when the day is over. The users are `AcmeChat` of loadtest/locustfile.py
(streaming chat with the Azure trace's lengths, one request every FAIRWAY_CYCLE_S seconds), so
the request rate is users / cycle. Give `--stop-timeout` so that a user the shape stops at
dusk finishes the request it has in flight instead of being cut off.
"""

from __future__ import annotations

import sys
from pathlib import Path

from locust import LoadTestShape

# locust imports this file by its path; its siblings are then top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from day import Day
from locustfile import AcmeChat

__all__ = ["AcmeChat", "DayShape"]


class DayShape(LoadTestShape):
    """Users over the run as `Day.from_env()` gives them; None (the end) after one day."""

    def __init__(self) -> None:
        super().__init__()
        self.day = Day.from_env()

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t >= self.day.seconds:
            return None
        # Spawn fast enough to follow the morning's rise within a tick.
        return self.day.users(t), float(max(10, self.day.peak_users))
