"""The `[batch]` table of `config.toml`: when the batch feed starts delay-tolerant requests."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictFloat
from pydantic.dataclasses import dataclass

from gateway.config.fields import TABLE

DAY_S = 24 * 3600.0  # OpenAI's batch API completes within a day: the default deadline and cap


@dataclass(frozen=True, slots=True, kw_only=True, config=TABLE)
class BatchConfig:
    """`[batch]`: batch requests start on a region only while its engines' in-flight load is
    below `feed_below` of their limits (the rest is the interactive requests' headroom), or
    regardless once their deadline is near. The default is `[fairness] overload_at`'s, so
    that batch load alone never turns the soft buckets on for interactive tenants."""

    feed_below: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.6
