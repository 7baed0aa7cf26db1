"""Demand forecasts per series: ARIMA on a rolling window of the past, seasonal-naive fallback.

A series is one value per minute (prompt tokens of one model, region and class, as SageServe
forecasts). `forecast(history, horizon)` sees only `history`, whose last value is the minute
just ended: nothing after it can leak in. The plan sizes engines for a high quantile of the
forecast, not its mean, because an engine asked for late cannot serve for minutes.

With `smooth_min` > 1 the series is first cut into blocks of that many minutes (the newest
block ends at the last minute) and the block means are forecast: a quantile of the demand a
queue has to absorb over a few minutes, not of one minute's count, which at a few requests a
minute is mostly Poisson noise that no forecast can follow.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt
from statsmodels.tsa.arima.model import ARIMA
from threadpoolctl import threadpool_limits

from planner.problem import BatchDemand

Method = Literal["arima", "seasonal-naive", "level", "none"]

DAY_MIN = 1440
WEEK_MIN = 7 * DAY_MIN


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    """How a series is forecast. Defaults follow SageServe: ARIMA(3,1,2) on per-minute values."""

    order: tuple[int, int, int] = (3, 1, 2)
    window: int = 360  # minutes fitted: the rolling window of the past
    min_history: int = 60  # fewer minutes than this: no ARIMA fit
    quantile: float = 0.95
    maxiter: int = 50  # optimiser iterations; a fit that has not converged by then still serves
    seasons: tuple[int, ...] = (DAY_MIN, WEEK_MIN)  # seasonal-naive lags: yesterday, last week
    level_window: int = 60  # minutes behind the level fallback when no season is known yet
    # A fit whose forecast passes this multiple of the window's peak has diverged (an explosive
    # AR root, a trend extrapolated from a burst): the fallback serves instead.
    max_ratio: float = 4.0
    # Minutes averaged into one forecast step (1: per minute); `window`, `min_history`,
    # `seasons` and `level_window` stay in minutes.
    smooth_min: int = 1

    def __post_init__(self) -> None:
        if not 0.5 <= self.quantile < 1:
            raise ValueError(f"quantile must be in [0.5, 1), got {self.quantile}")
        if self.smooth_min < 1:
            raise ValueError(f"smooth_min must be >= 1, got {self.smooth_min}")
        if self.window // self.smooth_min < 2 * sum(self.order) + 2:
            raise ValueError(
                f"window must be > 2 x the ARIMA order in steps of smooth_min, got {self.window}"
            )
        if self.max_ratio <= 0:
            raise ValueError(f"max_ratio must be > 0, got {self.max_ratio}")
        if self.min_history < 1 or self.maxiter < 1 or self.level_window < 1:
            raise ValueError("min_history, maxiter and level_window must be >= 1")
        if any(s < 1 for s in self.seasons):
            raise ValueError(f"seasons must be >= 1 minute, got {self.seasons}")


@dataclass(frozen=True, slots=True)
class SlotForecast:
    """One planning slot: the mean of the point forecast and the peak of its upper quantile."""

    point: float
    upper: float


@dataclass(frozen=True, slots=True)
class Forecast:
    """Per-minute forecast over the horizon, in the series' unit; `upper` >= `point` >= 0.
    Made with `smooth_min` > 1, every minute of a block carries the block's forecast."""

    method: Method
    point: tuple[float, ...]
    upper: tuple[float, ...]
    quantile: float
    fit_s: float  # wall time of the fit, fallbacks included

    def slots(self, slot_minutes: int) -> tuple[SlotForecast, ...]:
        """Aggregate into slots of `slot_minutes`; a partial last slot is kept.

        Capacity must hold through the slot's busiest minute, so `upper` is the largest
        per-minute quantile in the slot, while `point` is the slot's mean."""
        if slot_minutes < 1:
            raise ValueError(f"slot_minutes must be >= 1, got {slot_minutes}")
        out = []
        for i in range(0, len(self.point), slot_minutes):
            p = self.point[i : i + slot_minutes]
            u = self.upper[i : i + slot_minutes]
            out.append(SlotForecast(point=sum(p) / len(p), upper=max(u)))
        return tuple(out)


def deadline_slots(deadline_min: float, slot_minutes: float) -> int:
    """Slots after its release slot by whose end batch work released in it is due, so that
    work that arrived at the release slot's start still meets a deadline of `deadline_min`
    minutes: 60 minutes at 5-minute slots gives 11 (due by the end of slot i + 11)."""
    if slot_minutes <= 0:
        raise ValueError(f"slot_minutes must be > 0, got {slot_minutes}")
    # The small allowance keeps 0.3 / 0.1 from flooring to 2.
    return max(0, math.floor(deadline_min / slot_minutes + 1e-9) - 1)


def program_demand(
    forecasts: Mapping[tuple[str, str, str], Sequence[SlotForecast]],
    slot_minutes: float,
    deadline_slots: int,
    seconds_per_unit: float,
    last_slot: int | None = None,
) -> tuple[dict[tuple[str, str], tuple[float, ...]], tuple[BatchDemand, ...]]:
    """The integer program's demand from per-slot forecasts of (model, region, class) series
    in tokens per `seconds_per_unit` seconds: interactive tokens/s per (model, region) at the
    upper quantile, and each slot's expected batch work as one `BatchDemand`, released in its
    slot and due `deadline_slots` later (at most `last_slot`), in any region: SageServe moves
    it to where capacity idles."""
    interactive: dict[tuple[str, str], tuple[float, ...]] = {}
    batch: list[BatchDemand] = []
    per_minute = 60 / seconds_per_unit
    for (model, region, klass), slots in forecasts.items():
        if klass == "batch":
            for i, sl in enumerate(slots):
                tokens = sl.point * slot_minutes * per_minute
                if tokens > 0:
                    due = i + deadline_slots
                    if last_slot is not None:
                        due = min(due, last_slot)
                    batch.append(BatchDemand(f"{model}/{region}/{i}", model, tokens, due, i))
            continue
        old = interactive.get((model, region), (0.0,) * len(slots))
        interactive[model, region] = tuple(
            o + sl.upper / seconds_per_unit for o, sl in zip(old, slots, strict=True)
        )
    return interactive, tuple(batch)


def forecast(
    history: Sequence[float], horizon: int, cfg: ForecastConfig = ForecastConfig()
) -> Forecast:
    """Forecast the `horizon` minutes that follow `history` (oldest first, one value a minute).

    ARIMA when at least `cfg.min_history` minutes are known and the fit gives finite values
    within `cfg.max_ratio` of the window's peak;
    otherwise the same minute one season ago (yesterday, last week: the mean of those known),
    otherwise the recent level. Each method gives an upper `cfg.quantile`."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    t0 = time.perf_counter()
    y = np.asarray(history, dtype=float)
    if y.ndim != 1 or not np.all(np.isfinite(y)):
        raise ValueError("history must be a flat sequence of finite numbers")
    result: tuple[Method, npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
    w = cfg.smooth_min
    steps = -(-horizon // w)
    if w > 1:
        # Whole blocks only, aligned on the newest minute: the oldest partial block goes.
        y = y[len(y) % w :].reshape(-1, w).mean(axis=1)
        cfg = replace(
            cfg,
            window=cfg.window // w,
            min_history=-(-cfg.min_history // w),
            seasons=tuple(s // w for s in cfg.seasons if s % w == 0),
            level_window=-(-cfg.level_window // w),
            smooth_min=1,
        )
    if len(y) >= cfg.min_history:
        result = _arima(y[-cfg.window :], steps, cfg)
    if result is None:
        result = _seasonal_naive(y, steps, cfg)
    if result is None:
        result = _level(y, steps, cfg)
    method, point, upper = result
    point = np.maximum(point, 0.0)
    upper = np.maximum(upper, point)
    if w > 1:
        point, upper = np.repeat(point, w)[:horizon], np.repeat(upper, w)[:horizon]
    return Forecast(
        method=method,
        point=tuple(float(v) for v in point),
        upper=tuple(float(v) for v in upper),
        quantile=cfg.quantile,
        fit_s=time.perf_counter() - t0,
    )


def forecast_at(
    series: Sequence[float], t: int, horizon: int, cfg: ForecastConfig = ForecastConfig()
) -> Forecast:
    """The forecast made at minute `t` of a recorded series: it is given `series[:t]` only."""
    if not 0 <= t <= len(series):
        raise ValueError(f"t must be in [0, {len(series)}], got {t}")
    return forecast(series[:t], horizon, cfg)


def _arima(
    y: npt.NDArray[np.float64], horizon: int, cfg: ForecastConfig
) -> tuple[Method, npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    # Scaled to a mean of about 1: token counts in the 1e5s make the optimiser's steps awkward.
    scale = float(np.mean(np.abs(y))) or 1.0
    try:
        # The state-space matrices are tiny; BLAS threads only fight other processes for cores
        # (a 0.1 s fit took seconds on a busy machine without this limit).
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
            # Non-convergence and non-invertible starting values are expected on short windows:
            # the result is checked below instead.
            warnings.simplefilter("ignore")
            res = ARIMA(y / scale, order=cfg.order).fit(method_kwargs={"maxiter": cfg.maxiter})
            pred = res.get_forecast(horizon)
            mean = np.asarray(pred.predicted_mean, dtype=float)
            se = np.asarray(pred.se_mean, dtype=float)
    except (ValueError, np.linalg.LinAlgError):
        return None
    if mean.shape != (horizon,) or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(se))):
        return None
    if float(np.max(mean)) * scale > cfg.max_ratio * max(float(np.max(y)), 0.0):
        return None
    z = NormalDist().inv_cdf(cfg.quantile)
    return "arima", mean * scale, (mean + z * se) * scale


def _seasonal_naive(
    y: npt.NDArray[np.float64], horizon: int, cfg: ForecastConfig
) -> tuple[Method, npt.NDArray[np.float64], npt.NDArray[np.float64]] | None:
    n = len(y)
    steps = np.arange(1, horizon + 1)
    lags = [s for s in cfg.seasons if s >= horizon and n >= s]
    if not lags:
        return None
    # Minute n - 1 + h one season back sits at index n - 1 + h - s, inside the history.
    point = np.mean([y[n - 1 + steps - s] for s in lags], axis=0)
    # The spread is that of this very method's errors over the last day (the shortest season
    # given) it can be checked on.
    shortest = min(lags)
    checked = np.arange(max(shortest, n - min(cfg.seasons)), n)
    if len(checked) >= 2:
        errors = y[checked] - y[checked - shortest]
        spread = float(np.quantile(errors, cfg.quantile))
    else:
        spread = 0.0
    return "seasonal-naive", point, point + max(spread, 0.0)


def _level(
    y: npt.NDArray[np.float64], horizon: int, cfg: ForecastConfig
) -> tuple[Method, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if len(y) == 0:
        zeros = np.zeros(horizon)
        return "none", zeros, zeros
    recent = y[-cfg.level_window :]
    mean = float(np.mean(recent))
    upper = float(np.quantile(recent, cfg.quantile))
    return "level", np.full(horizon, mean), np.full(horizon, max(upper, mean))


def smape(actual: Sequence[float], predicted: Sequence[float]) -> float:
    """Symmetric mean absolute percentage error as a fraction in [0, 2]; 0/0 terms count 0."""
    a, p = _pair(actual, predicted)
    denom = np.abs(a) + np.abs(p)
    terms = np.divide(2 * np.abs(p - a), denom, out=np.zeros_like(a), where=denom > 0)
    return float(np.mean(terms))


def mape(actual: Sequence[float], predicted: Sequence[float]) -> float:
    """Mean absolute percentage error as a fraction, over the minutes whose actual is not 0."""
    a, p = _pair(actual, predicted)
    keep = a != 0
    if not np.any(keep):
        return math.nan
    return float(np.mean(np.abs(p[keep] - a[keep]) / np.abs(a[keep])))


def _pair(
    actual: Sequence[float], predicted: Sequence[float]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a = np.asarray(actual, dtype=float)
    p = np.asarray(predicted, dtype=float)
    if a.shape != p.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"actual and predicted must be equal, non-empty: {a.shape} vs {p.shape}")
    return a, p
