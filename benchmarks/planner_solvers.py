"""CBC against HiGHS on the planner benchmark's program at its busiest planning minute."""

from __future__ import annotations

import math
import time

from planner.ilp import highs_available, solve
from planner.policies import PastForecaster, Setting
from planner.problem import PlanInput, RunningEngine


def ilp_solvers(
    st: Setting, series: dict[tuple[str, str, str], list[float]], past: PastForecaster, minute: int
) -> dict[str, float]:
    """CBC against HiGHS on the evaluation's program at one planning minute (the busiest)."""
    fc = past.forecasts(minute, st.slot_minutes * st.slots)
    inter = {
        (m, r): tuple(f.upper for f in fc[m, r, "interactive"].slots(st.slot_minutes))
        for m, r in st.series
    }
    # Running now: what the forecast's first slot needs, the cheapest type first within the
    # quotas, so that the program is feasible.
    current = []
    used: dict[tuple[str, str], int] = {}
    for m, r in st.series:
        need = (1 + st.headroom) * inter[m, r][0]
        for e in st.by_preference(m):
            room = (st.quotas.get((r, e.gpu), 10**9) - used.get((r, e.gpu), 0)) // e.gpus
            n = min(room, math.ceil(need / e.tokens_per_s))
            if n > 0:
                current.append(RunningEngine(m, r, e.gpu, 60.0, n))
                used[r, e.gpu] = used.get((r, e.gpu), 0) + n * e.gpus
                need -= n * e.tokens_per_s
        if need > 0:
            raise ValueError(f"{m} in {r}: the quotas cannot hold the busiest program's demand")
    inp = PlanInput(
        st.regions,
        st.gpus,
        st.engines,
        st.slots,
        float(st.slot_minutes),
        inter,
        quotas=st.quotas,
        current=current,
        headroom=st.headroom,
        min_engines={k: 1 for k in st.series},
    )
    out = {}
    for solver in ("cbc", "highs"):
        if solver == "highs" and not highs_available():
            continue
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            solve(inp, solver=solver)  # type: ignore[arg-type]
            best = min(best, time.perf_counter() - t0)
        out[solver] = best
    return out
