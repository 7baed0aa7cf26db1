"""Output-length prediction: a LightGBM model when one is trained, running means otherwise.

`LengthModel` is a trained bundle: two boosters over the same features (`gateway.lengths.features`),
one for the median and one for an upper quantile of output tokens, both fitted to log(1 + n)
(quantiles survive a monotone transform, and the log tames a heavy tail), with the categorical
vocabularies they were trained with. `fairway train-router` writes it as one JSON file.

`LengthPredictor` is what the gateway and the simulator hold: it keeps each application's
recent output lengths (a feature, and the fallback), uses the model when there is one, reloads
it when its file changes, and never fails a request over it: without lightgbm, without a file,
or with a broken one it predicts from the application's recent lengths.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from gateway.lengths.features import CATEGORICAL, NUMERIC, Record

try:
    import lightgbm
    import numpy as np
except ImportError:  # the router extra is not installed: predict from running means
    lightgbm = None  # type: ignore[assignment]
    np = None  # type: ignore[assignment]

FORMAT = "fairway-length-model"
# Before an application has history: the Azure conversation trace's median and 0.9 quantile
# of generated tokens (docs/ENGINE.md).
PRIOR_MEDIAN = 151
PRIOR_UPPER = 480
log = structlog.get_logger("fairway.predictor")


class ModelError(Exception):
    """A model file that cannot be used (wrong format, or lightgbm missing)."""


@dataclass(frozen=True, slots=True)
class LengthModel:
    """A trained median and upper-quantile booster pair with its feature vocabularies."""

    median: Any  # lightgbm.Booster
    upper: Any
    vocab: dict[str, dict[str, int]]
    quantile: float
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, rec: Record) -> list[float]:
        """The model's input columns for one feature record; unknown or missing is NaN."""
        out: list[float] = []
        for name in CATEGORICAL:
            idx = self.vocab[name].get(str(rec.get(name)))
            out.append(math.nan if idx is None else float(idx))
        for name in NUMERIC:
            v = rec.get(name)
            out.append(math.nan if v is None else float(v))
        return out

    def predict_rows(self, rows: list[list[float]]) -> tuple[Any, Any]:
        """Median and upper quantile of output tokens for many rows (numpy arrays)."""
        x = np.asarray(rows, dtype=np.float64)
        med = np.expm1(self.median.predict(x, num_threads=1))
        up = np.expm1(self.upper.predict(x, num_threads=1))
        return np.maximum(med, 1.0), np.maximum(np.maximum(up, med), 1.0)

    def predict(self, rec: Record) -> tuple[int, int]:
        med, up = self.predict_rows([self.row(rec)])
        return round(float(med[0])), round(float(up[0]))

    def dumps(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": 1,
                "categorical": list(CATEGORICAL),
                "numeric": list(NUMERIC),
                "vocab": self.vocab,
                "quantile": self.quantile,
                "meta": self.meta,
                "median": self.median.model_to_string(),
                "upper": self.upper.model_to_string(),
            }
        )

    @classmethod
    def loads(cls, text: str) -> LengthModel:
        if lightgbm is None:
            raise ModelError("lightgbm is not installed (pip install 'fairway-llm[router]')")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ModelError(f"not a {FORMAT} file")
        if doc.get("categorical") != list(CATEGORICAL) or doc.get("numeric") != list(NUMERIC):
            raise ModelError("trained on other features; retrain with this version")
        try:
            median = lightgbm.Booster(model_str=doc["median"])
            upper = lightgbm.Booster(model_str=doc["upper"])
        except (lightgbm.basic.LightGBMError, KeyError, TypeError) as exc:
            raise ModelError(f"bad booster: {exc}") from None
        return cls(median, upper, doc["vocab"], float(doc["quantile"]), doc.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path) -> LengthModel:
        return cls.loads(Path(path).read_text())


class AppHistory:
    """The last `window` output lengths of each application (tenant/app)."""

    def __init__(self, window: int = 64) -> None:
        self.window = window
        self._lens: dict[str, deque[int]] = {}
        self._sums: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        q = self._lens.get(key)
        if q is None:
            q = self._lens[key] = deque(maxlen=self.window)
            self._sums[key] = 0
        if len(q) == q.maxlen:
            self._sums[key] -= q[0]
        q.append(n)
        self._sums[key] += n

    def mean(self, key: str) -> tuple[float | None, int]:
        q = self._lens.get(key)
        if not q:
            return None, 0
        return self._sums[key] / len(q), len(q)

    def quantiles(self, key: str, upper: float) -> tuple[int, int] | None:
        q = self._lens.get(key)
        if not q or len(q) < 5:
            return None
        s = sorted(q)
        return s[len(s) // 2], s[min(len(s) - 1, int(upper * len(s)))]


def app_key(rec: Record) -> str:
    return f"{rec.get('tenant')}/{rec.get('app')}"


class LengthPredictor:
    """Predicts (median, upper) output tokens; see the module docstring."""

    def __init__(self, model_path: str | Path | None = None, window: int = 64) -> None:
        self.path = Path(model_path) if model_path else None
        self.history = AppHistory(window)
        self.model: LengthModel | None = None
        self._stamp: tuple[int, int] | None = None
        self.maybe_reload()

    def maybe_reload(self) -> bool:
        """Load the model file if it changed since the last look; True when a new model is in
        use. A file that is missing or broken keeps the model in use (or the fallback)."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.model = LengthModel.load(self.path)
        except (OSError, ModelError) as exc:
            log.warning("length_model_unusable", path=str(self.path), reason=str(exc))
            return False
        log.info("length_model_loaded", path=str(self.path), **self.model.meta.get("eval", {}))
        return True

    def with_history(self, rec: Record) -> Record:
        """Add the application's recent output lengths to a feature record (in place)."""
        mean, n = self.history.mean(app_key(rec))
        rec["app_recent_mean"] = mean
        rec["app_recent_n"] = n
        return rec

    def predict(self, rec: Record) -> tuple[int, int]:
        """(median, upper) output tokens for a record from `with_history`."""
        q: tuple[int, int] | None = None
        if self.model is not None:
            try:
                q = self.model.predict(rec)
            except Exception as exc:  # a model bug must not fail the request it predicts for
                log.warning("length_model_failed", reason=repr(exc))
        if q is None:
            q = self.history.quantiles(app_key(rec), 0.9)
        med, up = q if q is not None else (PRIOR_MEDIAN, PRIOR_UPPER)
        cap = rec.get("max_tokens")
        if isinstance(cap, int):
            med, up = min(med, cap), min(up, cap)
        return max(1, med), max(1, up)

    def observe(self, rec: Record, output_tokens: int) -> None:
        self.history.add(app_key(rec), output_tokens)
