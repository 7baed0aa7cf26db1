"""What the gate core knows of a request: the values parsed from its body and headers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self is Endpoint.CHAT else "/v1/completions"


@dataclass(frozen=True, slots=True)
class RequestInfo:
    id: str
    tenant: str
    app: str
    interaction_id: str | None
    model: str
    endpoint: Endpoint
    prompt_tokens: int  # estimated; engines report the real count
    max_tokens: int | None
    stream: bool
    include_usage: bool  # the client asked for a usage chunk at the end of its stream
    arrival: float  # time.perf_counter() when the request arrived
    preferred_regions: tuple[str, ...] = ()
    # The length predictor's median and upper quantile of output tokens (None: not predicted).
    predicted_output_tokens: int | None = None
    predicted_output_upper: int | None = None
    # Completions the engine generates for it: max(n, best_of), each about as long as one.
    n: int = 1
    # `interactive` or `batch` (gateway.core.demand.CLASSES): the demand it counts in, and
    # for `batch` the queue it waits in (gateway.core.batch).
    klass: str = "interactive"
    # A batch request's deadline, on the clock of `arrival` (None: its application's default).
    deadline: float | None = None
