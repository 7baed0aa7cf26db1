"""A week of multi-region demand for the planner's evaluation, grown from the Azure trace.

The Azure LLM conversation trace holds one real hour of one service: arrival times and
(prompt, output) token counts. A week over three regions and four models needs what that hour
cannot give, so the long-range shape is synthetic and everything at the scale of one request is
real (docs/PLANNER_WORKLOAD.md gives the formulas, their parameters and measured figures):

- the expected rate of each (region, model) minute is `peak_rps x size x diurnal(local hour)
  x weekday factor x model share x burst x noise`, where the noise is a log-normal AR(1)
  calibrated on the real hour's minute-to-minute excess over Poisson;
- the minute's count is a Poisson draw of that rate;
- the minute's requests are real rows drawn without replacement from a real minute of the
  trace (from consecutive real minutes superposed when one holds too few): each keeps its
  offset within the minute and its prompt and output tokens, so sizes are resampled jointly
  and sub-minute burstiness is the trace's own;
- a share of the requests is batch, with a deadline log-uniform between two bounds.

The per-minute aggregates are what the gateway's demand counter reports: requests, prompt
tokens and output tokens per (model, region, class), each request counted in its arrival minute.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engines.perf_model import MODELS
from planner.workload_trace import (
    CLASSES,
    F64,
    I64,
    Burst,
    Region,
    Trace,
    WorkloadConfig,
    plot,
    summary,
)

# What callers of planner.workload import from it (docs/PLANNER_WORKLOAD.md): the generator,
# its files, and the types it takes and returns.
__all__ = [
    "CLASSES", "TRACE", "RealTrace", "Region", "Trace", "WorkloadConfig", "diurnal", "envelope",
    "generate", "load", "load_real", "main", "save",
]  # fmt: skip

# The Azure conversation trace, shipped compressed with the planner (planner/data/README.md).
TRACE = Path(__file__).resolve().parent / "data" / "azure_llm_2023_conv.csv.gz"


def diurnal(cfg: WorkloadConfig, local_hour: F64) -> F64:
    """Share of the peak rate at a local hour: a raised cosine lifted to `trough`."""
    wave = (1 + np.cos(2 * np.pi * (local_hour - cfg.peak_hour) / 24)) / 2
    out: F64 = cfg.trough + (1 - cfg.trough) * wave**cfg.sharpness
    return out


def envelope(cfg: WorkloadConfig, region: Region) -> F64:
    """Expected requests per second of `region` in each minute, before bursts and noise."""
    local_h = (np.arange(cfg.minutes) + 0.5) / 60 + region.utc_offset_h
    weekday = (cfg.start_weekday + np.floor(local_h / 24).astype(np.int64)) % 7
    week = np.where(weekday >= 5, cfg.weekend, 1.0)
    out: F64 = cfg.peak_rps * region.size * diurnal(cfg, local_h % 24) * week
    return out


@dataclass(frozen=True, slots=True)
class RealTrace:
    """The real hour as arrays, rows in time order, plus what the generator measures on it."""

    t_s: F64  # seconds since the first row
    prompt: I64
    output: I64

    @property
    def full_minutes(self) -> int:
        return int(self.t_s[-1] // 60)

    def minute_bounds(self) -> I64:
        """Row index where each full minute starts, and one past the last one's end."""
        edges = np.arange(self.full_minutes + 1) * 60.0
        out: I64 = np.searchsorted(self.t_s, edges, side="left").astype(np.int64)
        return out

    def minute_noise(self, window: int = 9) -> tuple[float, float]:
        """(sigma, rho) of the log per-minute counts around a centred moving average, with the
        Poisson part of the variance taken out: what a smooth curve plus Poisson misses."""
        counts = np.diff(self.minute_bounds()).astype(np.float64)
        logs = np.log(counts)
        trend = np.convolve(logs, np.ones(window) / window, mode="valid")
        resid = logs[window // 2 : window // 2 + trend.size] - trend
        sigma = math.sqrt(max(float(resid.var() - np.mean(1 / counts)), 0.0))
        rho = float(np.corrcoef(resid[:-1], resid[1:])[0, 1])
        return sigma, min(max(rho, 0.0), 0.99)


def load_real(path: Path = TRACE) -> RealTrace:
    """The Azure conversation trace (TIMESTAMP, ContextTokens, GeneratedTokens; a CSV file,
    gzip-compressed when its name ends in .gz) as arrays."""
    stamps: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            # Seven fractional digits in the file; fromisoformat takes six at most.
            ts = dt.datetime.fromisoformat(r["TIMESTAMP"][:26])
            stamps.append(ts.replace(tzinfo=dt.UTC).timestamp())
            prompt.append(int(r["ContextTokens"]))
            output.append(max(1, int(r["GeneratedTokens"])))
    order = np.argsort(np.array(stamps), kind="stable")
    t = np.array(stamps)[order]
    return RealTrace(t - t[0], np.array(prompt, np.int64)[order], np.array(output, np.int64)[order])


def generate(cfg: WorkloadConfig, real: RealTrace | None = None) -> Trace:
    """The trace `cfg` describes; the same config and real trace give the same arrays."""
    real = real if real is not None else load_real()
    # One stream per stage: switching bursts off (or changing the batch share) leaves every
    # other draw as it was, so variants of one seed differ only where they should.
    bursts_rng, noise_rng, count_rng, row_rng, class_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)
    )
    models = cfg.models
    n_reg, n_mod, n_min = len(cfg.regions), len(models), cfg.minutes
    sigma, rho = real.minute_noise()
    sigma = sigma if cfg.noise_sigma is None else cfg.noise_sigma
    rho = rho if cfg.noise_rho is None else cfg.noise_rho

    rate = np.zeros((n_reg, n_mod, n_min))  # requests per second
    for r, region in enumerate(cfg.regions):
        env = envelope(cfg, region)
        for model, share in region.mix:
            rate[r, models.index(model)] = env * share
    bursts = _bursts(cfg, bursts_rng)
    for b in bursts:
        r = [x.name for x in cfg.regions].index(b.region)
        rate[r, models.index(b.model), b.start_min : b.start_min + b.minutes] *= b.factor
    rate *= _ar1_lognormal(noise_rng, sigma, rho, (n_reg, n_mod, n_min))
    counts = count_rng.poisson(rate * 60).astype(np.int64)

    bounds = real.minute_bounds()
    sizes = np.diff(bounds)
    n_tpl = sizes.size
    per_cell = counts.sum(axis=1)  # (region, minute)
    # A template minute is chosen in proportion to its rows, so every real row is equally
    # likely overall and the sizes' distribution is the trace's.
    starts = row_rng.choice(n_tpl, size=per_cell.shape, p=sizes / sizes.sum())
    picks: list[I64] = []
    for r in range(n_reg):
        for m in range(n_min):
            need = int(per_cell[r, m])
            if need:
                picks.append(_draw_rows(row_rng, bounds, sizes, int(starts[r, m]), need))
    rows = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    cell_min = np.repeat(np.tile(np.arange(n_min), n_reg), per_cell.ravel())
    region_ix = np.repeat(np.repeat(np.arange(n_reg), n_min), per_cell.ravel())
    # Rows come in random order within a cell, so labelling them model by model is a random split.
    model_ix = np.repeat(
        np.tile(np.arange(n_mod), n_reg * n_min), counts.transpose(0, 2, 1).ravel()
    )

    arrival = cell_min * 60.0 + (real.t_s[rows] - 60.0 * np.floor(real.t_s[rows] / 60))
    output = real.output[rows]
    max_len = np.array([MODELS[m].max_model_len for m in models], np.int64)[model_ix]
    prompt = np.minimum(real.prompt[rows], np.maximum(max_len - output, 1))
    batch = class_rng.random(rows.size) < cfg.batch_share
    lo, hi = cfg.deadline_h
    wait_h = np.exp(class_rng.uniform(math.log(lo), math.log(hi), rows.size))
    deadline = np.where(batch, arrival + 3600.0 * wait_h, math.inf)

    o = np.argsort(arrival, kind="stable")
    return Trace(
        cfg, arrival[o], region_ix[o], model_ix[o], batch[o], prompt[o], output[o], deadline[o],
        bursts,
    )  # fmt: skip


def _bursts(cfg: WorkloadConfig, rng: np.random.Generator) -> tuple[Burst, ...]:
    out: list[Burst] = []
    for region in cfg.regions:
        names = [m for m, _ in region.mix]
        shares = np.array([s for _, s in region.mix])
        for _ in range(int(rng.poisson(cfg.bursts_per_day * cfg.days))):
            length = int(rng.integers(cfg.burst_minutes[0], cfg.burst_minutes[1] + 1))
            out.append(Burst(region.name, names[int(rng.choice(len(names), p=shares))],
                             int(rng.integers(0, max(1, cfg.minutes - length))), length,
                             round(float(rng.uniform(*cfg.burst_factor)), 3)))  # fmt: skip
    return tuple(sorted(out, key=lambda b: (b.start_min, b.region)))


def _ar1_lognormal(
    rng: np.random.Generator, sigma: float, rho: float, shape: tuple[int, int, int]
) -> F64:
    """Mean-one multipliers exp(z - sigma^2 / 2), z a stationary AR(1) along the last axis."""
    eps = rng.standard_normal(shape) * sigma * math.sqrt(1 - rho * rho)
    z = np.empty(shape)
    z[..., 0] = rng.standard_normal(shape[:-1]) * sigma
    for t in range(1, shape[-1]):
        z[..., t] = rho * z[..., t - 1] + eps[..., t]
    out: F64 = np.exp(z - sigma * sigma / 2)
    return out


def _draw_rows(rng: np.random.Generator, bounds: I64, sizes: I64, start: int, need: int) -> I64:
    """`need` distinct real rows from template minute `start`, and the ones after it (cyclically)
    while it holds too few; rows repeat only once every real minute is used up."""
    n_tpl = sizes.size
    k, have = 0, 0
    while have < need and k < n_tpl:
        have += int(sizes[(start + k) % n_tpl])
        k += 1
    pool = np.concatenate([np.arange(bounds[j], bounds[j + 1]) for j in
                           (np.arange(start, start + k) % n_tpl)])  # fmt: skip
    out: I64 = rng.choice(pool, size=need, replace=need > pool.size)
    return out


def save(trace: Trace, path: Path) -> None:
    """A compressed .npz: the request arrays plus the config and bursts as JSON."""
    meta = {"config": asdict(trace.config), "bursts": [asdict(b) for b in trace.bursts]}
    # Through a file object: given a name, numpy would append ".npz" to it.
    with open(path, "wb") as f:
        np.savez_compressed(
            f,
            meta=np.array(json.dumps(meta)),
            arrival_s=trace.arrival_s,
            region=trace.region.astype(np.int8),
            model=trace.model.astype(np.int8),
            batch=trace.batch,
            prompt=trace.prompt.astype(np.int32),
            output=trace.output.astype(np.int32),
            deadline_s=trace.deadline_s,
        )


def load(path: Path) -> Trace:
    """A trace written by `save`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        c = meta["config"]
        regions = tuple(
            Region(r["name"], r["utc_offset_h"], r["size"], tuple((m, s) for m, s in r["mix"]))
            for r in c.pop("regions")
        )
        # JSON turned the config's tuples into lists.
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}
        cfg = WorkloadConfig(regions=regions, **kw)
        return Trace(
            cfg,
            z["arrival_s"].astype(np.float64),
            z["region"].astype(np.int64),
            z["model"].astype(np.int64),
            z["batch"].astype(np.bool_),
            z["prompt"].astype(np.int64),
            z["output"].astype(np.int64),
            z["deadline_s"].astype(np.float64),
            tuple(Burst(**b) for b in meta["bursts"]),
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m planner.workload", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    rps_help = "requests per second at the weekday peak of a region of size 1"
    p.add_argument("--peak-rps", type=float, default=1.0, help=rps_help)
    p.add_argument("--trace", type=Path, default=TRACE, help="the Azure conversation trace CSV")
    p.add_argument("--plot", type=Path, help="also draw requests per minute per region here")
    a = p.parse_args(argv)
    try:
        cfg = WorkloadConfig(days=a.days, seed=a.seed, peak_rps=a.peak_rps)
    except ValueError as e:
        p.error(str(e))
    trace = generate(cfg, load_real(a.trace))
    save(trace, a.out)
    if a.plot:
        plot(trace, a.plot)
    print(summary(trace))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
