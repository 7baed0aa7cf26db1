"""`fairway train-router`: fit the output-length model on feature logs and report its accuracy.

The logs are split in time order: the last `holdout` share is never trained on. Held out, the
model is compared with the two predictors one would use without it: the global mean and the
per-application mean of the training part. Metrics: mean absolute error of the median (tokens),
length-bucket accuracy, and how often the real length is under the upper quantile (coverage).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.lengths.featurelog import log_files
from gateway.lengths.features import CATEGORICAL, NUMERIC, TARGET, Record
from gateway.lengths.predictor import LengthModel, app_key

BUCKETS = (32, 64, 128, 256, 512, 1024)  # upper edges of length buckets; the last is open


def bucket(n: float) -> int:
    for i, edge in enumerate(BUCKETS):
        if n < edge:
            return i
    return len(BUCKETS)


def read_logs(paths: Sequence[str | Path]) -> list[Record]:
    """Records with a real output length, in file order; malformed lines are skipped."""
    out: list[Record] = []
    for path in log_files(list(paths)):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get(TARGET), int):
                    out.append(rec)
    return out


@dataclass(frozen=True, slots=True)
class Scores:
    mae: float
    bucket_accuracy: float
    coverage: float  # share of real lengths <= the upper prediction


def score(actual: Sequence[int], median: Iterable[float], upper: Iterable[float]) -> Scores:
    n = len(actual)
    mae = acc = cov = 0.0
    for y, m, u in zip(actual, median, upper, strict=True):
        mae += abs(y - m)
        acc += bucket(y) == bucket(m)
        cov += y <= u
    return Scores(float(mae) / n, float(acc) / n, float(cov) / n)


def _quantile(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def baselines(train: Sequence[Record], test: Sequence[Record], q: float) -> dict[str, Scores]:
    ys = [r[TARGET] for r in train]
    mean, upper = sum(ys) / len(ys), _quantile(ys, q)
    per: dict[str, list[int]] = {}
    for r in train:
        per.setdefault(app_key(r), []).append(r[TARGET])
    app_mean = {k: sum(v) / len(v) for k, v in per.items()}
    app_upper = {k: _quantile(v, q) for k, v in per.items()}
    actual = [r[TARGET] for r in test]
    keys = [app_key(r) for r in test]
    return {
        "global mean": score(actual, [mean] * len(test), [upper] * len(test)),
        "per-application mean": score(
            actual, [app_mean.get(k, mean) for k in keys], [app_upper.get(k, upper) for k in keys]
        ),
    }


def fit(
    train: Sequence[Record],
    *,
    quantile: float = 0.9,
    rounds: int = 300,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> LengthModel:
    """Train the median and upper-quantile boosters on `train`."""
    import lightgbm
    import numpy as np

    vocab = {c: {} for c in CATEGORICAL}  # type: dict[str, dict[str, int]]
    for r in train:
        for c in CATEGORICAL:
            vocab[c].setdefault(str(r.get(c)), len(vocab[c]))
    shell = LengthModel(None, None, vocab, quantile)
    x = np.asarray([shell.row(r) for r in train], dtype=np.float64)
    y = np.log1p(np.asarray([r[TARGET] for r in train], dtype=np.float64))
    names = [*CATEGORICAL, *NUMERIC]
    base: dict[str, Any] = {
        "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20,
        "feature_fraction": 0.9, "verbosity": -1, "seed": seed, "num_threads": 2,
        "deterministic": True, "force_row_wise": True,
    }  # fmt: skip
    boosters = []
    for step, alpha in enumerate((0.5, quantile)):
        data = lightgbm.Dataset(x, y, feature_name=names, categorical_feature=list(CATEGORICAL),
                                free_raw_data=False)  # fmt: skip
        callbacks = []
        if progress is not None:
            offset = step * rounds

            def tick(env: Any, offset: int = offset) -> None:
                assert progress is not None
                progress(offset + env.iteration + 1)

            callbacks.append(tick)
        params = {**base, "objective": "quantile", "alpha": alpha}
        boosters.append(lightgbm.train(params, data, num_boost_round=rounds, callbacks=callbacks))
    return LengthModel(boosters[0], boosters[1], vocab, quantile)


def save(model: LengthModel, path: str | Path) -> None:
    """Write atomically: a gateway watching the file never reads half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(model.dumps())
    os.replace(tmp, path)


def train_and_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    holdout: float = 0.2,
    quantile: float = 0.9,
    rounds: int = 300,
    show_progress: bool = True,
) -> dict[str, Scores]:
    """Train on the logs, save the model to `out`, and return held-out scores by predictor."""
    from tqdm import tqdm

    recs = read_logs(paths)
    if len(recs) < 20:
        raise ValueError(f"{len(recs)} usable records in the logs; at least 20 are needed")
    cut = max(1, min(len(recs) - 1, math.floor(len(recs) * (1 - holdout))))
    train, test = recs[:cut], recs[cut:]
    with tqdm(total=2 * rounds, desc="training", unit="round", disable=not show_progress) as bar:

        def progress(i: int) -> None:
            bar.update(i - bar.n)

        model = fit(train, quantile=quantile, rounds=rounds, progress=progress)
    med, up = model.predict_rows([model.row(r) for r in test])
    report = {"LightGBM": score([r[TARGET] for r in test], med, up)}
    report.update(baselines(train, test, quantile))
    meta = {"train": len(train), "test": len(test),
            "eval": {f"{k}_mae": round(v.mae, 2) for k, v in report.items()}}  # fmt: skip
    save(LengthModel(model.median, model.upper, model.vocab, quantile, meta), out)
    return report


def format_report(report: dict[str, Scores], quantile: float = 0.9) -> str:
    cov = f"p{round(quantile * 100)} coverage"
    lines = [f"{'predictor':<22} {'MAE (tokens)':>12} {'bucket acc':>10} {cov:>13}"]
    for name, s in report.items():
        lines.append(f"{name:<22} {s.mae:>12.1f} {s.bucket_accuracy:>10.1%} {s.coverage:>13.1%}")
    return "\n".join(lines)
