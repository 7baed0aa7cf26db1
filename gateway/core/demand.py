"""Demand per minute: requests, prompt tokens and output tokens per (model, region, class).

What the planner forecasts from (SageServe plans on per-minute prompt tokens per model and
region). A request counts in the minute it ends, in the region of the engine that served it,
under its class: `interactive` (wants an answer now) or `batch` (tolerates delay). Each
series keeps the last `keep_minutes` in a ring of fixed size, so memory is bounded whatever
the traffic: 3 numbers a minute per series.

Pure: the gateway adds to it as requests end, and shares it through Redis when it runs as
several replicas (`gateway.state.cluster`); the admin API and `fairway plan` read it.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

CLASSES = ("interactive", "batch")
FIELDS = ("requests", "prompt_tokens", "output_tokens")
Key = tuple[str, str, str]  # (model, region, class)


@dataclass(frozen=True, slots=True)
class Point:
    minute: int  # minutes since the Unix epoch
    requests: int
    prompt_tokens: int
    output_tokens: int


class _Ring:
    """One series: minute m lives at index m % size while it is among the last `size`."""

    __slots__ = ("latest", "minutes", "size", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.values = array("q", bytes(8 * 3 * size))
        self.minutes = array("q", [-1]) * size  # which minute each slot holds
        self.latest = -1

    def add(self, minute: int, requests: int, prompt: int, output: int) -> None:
        if minute <= self.latest - self.size:
            return  # older than the ring keeps
        i = minute % self.size
        if self.minutes[i] != minute:
            self.minutes[i] = minute
            self.values[3 * i : 3 * i + 3] = array("q", [0, 0, 0])
        self.values[3 * i] += requests
        self.values[3 * i + 1] += prompt
        self.values[3 * i + 2] += output
        self.latest = max(self.latest, minute)

    def points(self, since: int, until: int) -> Iterator[Point]:
        """Every minute in [since, until), zeros where nothing was counted."""
        for m in range(max(since, self.latest - self.size + 1), until):
            i = m % self.size
            if self.minutes[i] == m:
                v = self.values
                yield Point(m, v[3 * i], v[3 * i + 1], v[3 * i + 2])
            else:
                yield Point(m, 0, 0, 0)


class Demand:
    """Per-minute demand of every (model, region, class) seen, the last `keep_minutes`."""

    def __init__(self, keep_minutes: int = 7 * 24 * 60) -> None:
        if keep_minutes < 1:
            raise ValueError("keep_minutes must be >= 1")
        self.keep_minutes = keep_minutes
        self._series: dict[Key, _Ring] = {}

    def add(
        self, key: Key, now_s: float, *, requests: int = 1, prompt: int = 0, output: int = 0
    ) -> None:
        """Count a request (or `requests` of them) that ended at `now_s` (Unix seconds)."""
        ring = self._series.get(key)
        if ring is None:
            ring = self._series[key] = _Ring(self.keep_minutes)
        ring.add(int(now_s // 60), requests, max(0, prompt), max(0, output))

    def series_keys(self) -> list[Key]:
        return sorted(self._series)

    def series(self, key: Key, since: int, until: int) -> list[Point]:
        """Minutes [since, until) of `key` (minutes since the epoch), zeros where none."""
        ring = self._series.get(key)
        return [] if ring is None else list(ring.points(since, until))

    def merge(self, key: Key, points: list[Point]) -> None:
        """Add counts from elsewhere (another replica's)."""
        for p in points:
            if p.requests or p.prompt_tokens or p.output_tokens:
                ring = self._series.get(key)
                if ring is None:
                    ring = self._series[key] = _Ring(self.keep_minutes)
                ring.add(p.minute, p.requests, p.prompt_tokens, p.output_tokens)
