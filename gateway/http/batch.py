"""A request's class and deadline: its application's `demand_class`, and the client's headers.

`X-Fairway-Class: batch` marks a request delay-tolerant: it waits in the batch feed
(`gateway.core.batch`) until a region has room, at the latest until its deadline,
`X-Fairway-Deadline` seconds after it arrived (default its application's `batch_deadline_s`,
at most its `batch_max_deadline_s`). Any application may send batch work; an application whose
`demand_class` is `batch` may claim `interactive` only where its config says
`allow_interactive = true`, since interactive requests are never held back for others.
"""

from __future__ import annotations

import math
import re

from gateway.config.schema import AppConfig
from gateway.core.errors import bad_request

CLASS_HEADER = "X-Fairway-Class"
DEADLINE_HEADER = "X-Fairway-Deadline"
CLASSES = ("interactive", "batch")
# Plain decimal seconds: no signs, exponents, `inf`, `nan` or digit separators.
_SECONDS = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,9})?$")


def request_class(
    app: AppConfig, where: str, klass: str | None, deadline: str | None, arrival: float
) -> tuple[str, float | None]:
    """The class of a request of `app` (`where` names its config table, for errors) and, for
    `batch`, its deadline on the clock of `arrival`; raises a 400 naming the header."""
    chosen: str = app.demand_class or "interactive"
    if klass is not None:
        given = klass.strip().lower()
        if given not in CLASSES:
            raise bad_request(
                f"{CLASS_HEADER} must be one of {', '.join(CLASSES)}, got {klass[:64]!r}",
                CLASS_HEADER,
            )
        if given == "interactive" and chosen == "batch" and not app.allow_interactive:
            raise bad_request(
                f"{CLASS_HEADER}: interactive is not allowed for this application, whose "
                f"demand_class is batch ({where}.allow_interactive is false)",
                CLASS_HEADER,
            )
        chosen = given
    if chosen != "batch":
        if deadline is not None:
            raise bad_request(
                f"{DEADLINE_HEADER} applies to batch requests only; send {CLASS_HEADER}: batch",
                DEADLINE_HEADER,
            )
        return chosen, None
    cap = app.batch_max_deadline_s or math.inf
    if deadline is None:
        return chosen, arrival + min(app.batch_deadline_s or cap, cap)
    value = deadline.strip()
    seconds = float(value) if _SECONDS.match(value) else math.nan
    if not 0 < seconds <= cap:  # nan fails too
        raise bad_request(
            f"{DEADLINE_HEADER} must be a number of seconds from now, more than 0 and at most "
            f"{cap:g} ({where}.batch_max_deadline_s), got {deadline[:64]!r}",
            DEADLINE_HEADER,
        )
    return chosen, arrival + seconds
