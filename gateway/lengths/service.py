"""The request path's predict step: features in, predicted output length out, outcome logged.

`LengthService` is the thin stateful layer around the pure pieces: it extracts a request's
features (`gateway.lengths.features`), asks the `LengthPredictor` for its median and upper output
length, stamps them on the `RequestInfo` the router and the fairness queue see, and when the
request finishes feeds the real length back (the application's history) and appends the
record to the feature log that `fairway train-router` learns from.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import structlog

from gateway.core.request import RequestInfo
from gateway.lengths.featurelog import FeatureLog
from gateway.lengths.features import TARGET, Record, extract
from gateway.lengths.predictor import LengthPredictor

REGIONS_HEADER = "X-Fairway-Regions"
log = structlog.get_logger("fairway.lengths")


class LengthService:
    def __init__(
        self,
        predictor: LengthPredictor,
        log: FeatureLog | None = None,
        preferred_regions: tuple[str, ...] = (),
    ) -> None:
        self.predictor = predictor
        self.log = log
        self.preferred_regions = preferred_regions

    def annotate(
        self, info: RequestInfo, body: dict[str, Any], regions: str | None = None
    ) -> tuple[RequestInfo, Record]:
        """`info` with its predicted output length and preferred regions (a comma-separated
        header value overrides the configured default), and the features behind it."""
        rec = self.predictor.with_history(extract(info, body))
        med, up = self.predictor.predict(rec)
        prefer = self.preferred_regions
        if regions:
            prefer = tuple(r.strip() for r in regions.split(",") if r.strip())[:8]
        info = replace(
            info,
            predicted_output_tokens=med,
            predicted_output_upper=up,
            preferred_regions=prefer or info.preferred_regions,
        )
        return info, rec

    def finish(self, info: RequestInfo, rec: Record, output_tokens: int | None,
               **outcome: Any) -> None:  # fmt: skip
        """A request ended. Only complete answers teach anything: an aborted or failed one
        says nothing of how long the answer would have been."""
        if output_tokens is None:
            return
        self.predictor.observe(rec, output_tokens)
        if self.log is not None:
            rec = dict(rec)
            rec["predicted"] = info.predicted_output_tokens
            rec["predicted_upper"] = info.predicted_output_upper
            rec.update(outcome)
            rec[TARGET] = output_tokens
            try:
                self.log.write(rec)
            except OSError as exc:  # a full disk loses training data, never a response
                log.warning("feature_log_failed", reason=str(exc))

    async def watch(self, interval: float) -> None:
        """Reload the model when its file changes, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            # Parsing a model takes milliseconds: keep it off the event loop.
            await asyncio.to_thread(self.predictor.maybe_reload)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
