"""The workload's types: the generator's knobs and regions, and a generated trace.

A `Trace` holds one entry per request in each of its arrays, in arrival order; `requests()`
gives them one by one as the simulator replays them and `demand()` the per-minute aggregates
the gateway's demand counter reports. `summary` and `plot` show a trace; planner.workload
generates, saves and loads one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines.perf_model import MODELS

CLASSES = ("interactive", "batch")
DAY_MIN = 1440

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Region:
    """A region's clock, its size relative to the others, and its model mix (shares sum to 1)."""

    name: str
    utc_offset_h: float
    size: float
    mix: tuple[tuple[str, float], ...]


_FOUR = ("llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-14b")
REGIONS: tuple[Region, ...] = (
    Region("us-east", -5.0, 1.0, tuple(zip(_FOUR, (0.40, 0.30, 0.15, 0.15), strict=True))),
    Region("eu-west", 1.0, 0.7, tuple(zip(_FOUR, (0.30, 0.20, 0.35, 0.15), strict=True))),
    Region("ap-south", 5.5, 0.5, tuple(zip(_FOUR, (0.35, 0.15, 0.10, 0.40), strict=True))),
)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Every knob of the generator; `peak_rps` scales the whole trace linearly."""

    days: int = 7
    seed: int = 0
    peak_rps: float = 1.0  # requests per second at the weekday peak of a region of size 1
    regions: tuple[Region, ...] = REGIONS
    start_weekday: int = 0  # weekday (Monday 0) of UTC midnight at t = 0
    peak_hour: float = 14.0  # local hour of the diurnal peak
    trough: float = 0.2  # diurnal minimum as a share of the peak
    sharpness: float = 2.0  # exponent of the raised cosine: larger, a narrower working day
    weekend: float = 0.6  # Saturday and Sunday (local) relative to a weekday
    batch_share: float = 0.2
    deadline_h: tuple[float, float] = (1.0, 24.0)  # batch deadlines, log-uniform in between
    bursts_per_day: float = 1.0  # per region, each on one model
    burst_factor: tuple[float, float] = (2.0, 4.0)
    burst_minutes: tuple[int, int] = (10, 40)
    # Minute-level noise; None takes the figure measured on the trace's hour.
    noise_sigma: float | None = None
    noise_rho: float | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, rule: str, got: object) -> None:
            if not ok:
                raise ValueError(f"{key} must be {rule}, got {got!r}")

        need(self.days >= 1, "days", ">= 1", self.days)
        need(self.peak_rps > 0, "peak_rps", "> 0", self.peak_rps)
        need(len(self.regions) > 0, "regions", "non-empty", self.regions)
        need(0 <= self.start_weekday < 7, "start_weekday", "in [0, 7)", self.start_weekday)
        need(0 <= self.peak_hour < 24, "peak_hour", "in [0, 24)", self.peak_hour)
        need(0 <= self.trough <= 1, "trough", "in [0, 1]", self.trough)
        need(self.sharpness > 0, "sharpness", "> 0", self.sharpness)
        need(self.weekend >= 0, "weekend", ">= 0", self.weekend)
        need(0 <= self.batch_share <= 1, "batch_share", "in [0, 1]", self.batch_share)
        lo, hi = self.deadline_h
        need(0 < lo <= hi, "deadline_h", "0 < low <= high", self.deadline_h)
        need(self.bursts_per_day >= 0, "bursts_per_day", ">= 0", self.bursts_per_day)
        need(1 <= self.burst_factor[0] <= self.burst_factor[1], "burst_factor", "1 <= low <= high",
             self.burst_factor)  # fmt: skip
        need(1 <= self.burst_minutes[0] <= self.burst_minutes[1], "burst_minutes",
             "1 <= low <= high", self.burst_minutes)  # fmt: skip
        need(self.noise_sigma is None or self.noise_sigma >= 0, "noise_sigma", ">= 0",
             self.noise_sigma)  # fmt: skip
        need(self.noise_rho is None or -1 < self.noise_rho < 1, "noise_rho", "in (-1, 1)",
             self.noise_rho)  # fmt: skip
        names = [r.name for r in self.regions]
        need(len(set(names)) == len(names), "regions", "uniquely named", names)
        for r in self.regions:
            need(r.size > 0, f"regions.{r.name}.size", "> 0", r.size)
            need(-12 <= r.utc_offset_h <= 14, f"regions.{r.name}.utc_offset_h", "in [-12, 14]",
                 r.utc_offset_h)  # fmt: skip
            for model, share in r.mix:
                need(model in MODELS, f"regions.{r.name}.mix", f"models of {sorted(MODELS)}",
                     model)  # fmt: skip
                need(share >= 0, f"regions.{r.name}.mix.{model}", ">= 0", share)
            total = sum(s for _, s in r.mix)
            need(abs(total - 1) < 1e-6, f"regions.{r.name}.mix", "shares summing to 1", total)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model of any region's mix, in first-seen order."""
        return tuple(dict.fromkeys(m for r in self.regions for m, _ in r.mix))

    @property
    def minutes(self) -> int:
        return self.days * DAY_MIN


@dataclass(frozen=True, slots=True)
class Burst:
    region: str
    model: str
    start_min: int
    minutes: int
    factor: float


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    region: str
    model: str
    cls: str  # "interactive" or "batch"
    prompt_tokens: int
    output_tokens: int
    deadline_s: float  # absolute, seconds from the start; inf for interactive requests


@dataclass(frozen=True, slots=True)
class Demand:
    """Per-minute aggregates, each of shape (model, region, class, minute)."""

    requests: I64
    prompt_tokens: I64
    output_tokens: I64


@dataclass(frozen=True, slots=True)
class Trace:
    """A generated trace: one entry per request in every array, in arrival order."""

    config: WorkloadConfig
    arrival_s: F64
    region: I64  # index into config.regions
    model: I64  # index into config.models
    batch: npt.NDArray[np.bool_]
    prompt: I64
    output: I64
    deadline_s: F64
    bursts: tuple[Burst, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    def requests(self) -> Iterator[Request]:
        """The requests one by one, in arrival order, as the simulator replays them."""
        regions = [r.name for r in self.config.regions]
        models = self.config.models
        for i in range(len(self)):
            yield Request(
                float(self.arrival_s[i]),
                regions[self.region[i]],
                models[self.model[i]],
                CLASSES[int(self.batch[i])],
                int(self.prompt[i]),
                int(self.output[i]),
                float(self.deadline_s[i]),
            )

    def demand(self) -> Demand:
        """Per-minute requests, prompt and output tokens per (model, region, class)."""
        cfg = self.config
        shape = (len(cfg.models), len(cfg.regions), len(CLASSES), cfg.minutes)
        minute = np.minimum((self.arrival_s // 60).astype(np.int64), cfg.minutes - 1)
        cell = np.ravel_multi_index((self.model, self.region, self.batch.astype(np.int64), minute),
                                    shape)  # fmt: skip
        n = math.prod(shape)

        def total(weights: I64 | None) -> I64:
            out: I64 = np.bincount(cell, weights, minlength=n).astype(np.int64).reshape(shape)
            return out

        return Demand(total(None), total(self.prompt), total(self.output))


def weekday_ratio(trace: Trace, r: int) -> float:
    """Mean requests of region `r` on a local weekend day over a local weekday, whole local days
    only; NaN when the trace holds no whole day of either kind."""
    cfg = trace.config
    shift = round(cfg.regions[r].utc_offset_h * 60)
    local_day = (trace.arrival_s[trace.region == r] // 60 + shift) // DAY_MIN
    first = math.ceil(shift / DAY_MIN)  # the first local day that starts at or after t = 0
    last = (cfg.minutes + shift) // DAY_MIN  # one past the last that ends by the trace's end
    days = np.arange(first, last)
    if days.size == 0:
        return math.nan
    per_day = np.bincount((local_day - first).astype(np.int64)[local_day >= first],
                          minlength=days.size)[: days.size]  # fmt: skip
    weekend = (cfg.start_weekday + days) % 7 >= 5
    if weekend.all() or not weekend.any():
        return math.nan
    return float(per_day[weekend].mean() / per_day[~weekend].mean())


def summary(trace: Trace) -> str:
    """Requests per (region, model), batch share, hourly peak and trough in requests per minute,
    weekend over weekday and median sizes, as a fixed-width table."""
    cfg = trace.config
    per_min = trace.demand().requests.sum(axis=(0, 2))  # (region, minute)
    hours = cfg.minutes // 60
    rows = [["region", *cfg.models, "total", "batch %", "peak/min", "trough/min", "wkend/wkday"]]
    for r, region in enumerate(cfg.regions):
        mine = trace.region == r
        hourly = per_min[r, : hours * 60].reshape(hours, 60).mean(axis=1)
        by_model = np.bincount(trace.model[mine], minlength=len(cfg.models))
        rows.append(
            [region.name, *(str(n) for n in by_model), str(int(mine.sum())),
             f"{100 * trace.batch[mine].mean():.1f}", f"{hourly.max():.1f}",
             f"{hourly.min():.1f}", f"{weekday_ratio(trace, r):.2f}"]
        )  # fmt: skip
    by_model = np.bincount(trace.model, minlength=len(cfg.models))
    rows.append(["all", *(str(n) for n in by_model), str(len(trace)),
                 f"{100 * trace.batch.mean():.1f}", "", "", ""])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        (name, width), *rest = zip(row, widths, strict=True)
        cells = [name.ljust(width), *(c.rjust(w) for c, w in rest)]
        return "  ".join(cells).rstrip()

    lines = [line(row) for row in rows]
    lines.append(
        f"{len(trace)} requests over {cfg.days} days, peak_rps {cfg.peak_rps:g}, seed {cfg.seed}; "
        f"median prompt {np.median(trace.prompt):.0f}, output {np.median(trace.output):.0f} "
        f"tokens; {len(trace.bursts)} bursts"
    )
    return "\n".join(lines)


def plot(trace: Trace, path: Path) -> None:
    """Requests per minute per region over the trace (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = trace.config
    d = trace.demand().requests.sum(axis=(0, 2))
    days = np.arange(cfg.minutes) / DAY_MIN
    fig, ax = plt.subplots(figsize=(12, 4), layout="constrained")
    for r, region in enumerate(cfg.regions):
        ax.plot(days, d[r], lw=0.4, label=f"{region.name} (UTC{region.utc_offset_h:+g})")
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    ax.set_xticks(np.arange(cfg.days + 1))
    ax.set_xticklabels([names[(cfg.start_weekday + i) % 7] for i in range(cfg.days + 1)])
    ax.set_xlabel("day (UTC midnight)")
    ax.set_ylabel("requests per minute")
    ax.set_title(f"Planner workload: {len(trace)} requests, peak_rps {cfg.peak_rps:g}")
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
