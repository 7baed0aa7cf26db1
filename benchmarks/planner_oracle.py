"""The planner benchmark's oracle: its candidates, their policy names and the choice of one.

The oracle sizes every slot for its busiest W-minute mean of the true demand plus headroom H;
each (W, H) candidate is replayed as `oracle@W:H`, and the oracle is the cheapest that keeps
reactive scaling's SLO attainment.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

Candidate = tuple[int, float]
# The true future at the plan's headroom and around it, narrower means with less headroom.
ORACLES: tuple[Candidate, ...] = ((2, 0.15), (2, 0.2), (1, 0.06), (1, 0.12))


def oracle_name(c: Candidate) -> str:
    return f"oracle@{c[0]}:{c[1]:g}"


def parse_candidate(text: str) -> Candidate:
    """`W:H` as (W, H); ValueError unless W >= 1 and H is finite and >= 0."""
    w, sep, h = text.partition(":")
    try:
        cand = (int(w), float(h))
    except ValueError:
        cand = (0, math.nan)
    if not (sep and cand[0] >= 1 and math.isfinite(cand[1]) and cand[1] >= 0):
        raise ValueError(f"expected W:H pairs (W >= 1, H >= 0), got {text!r}")
    return cand


def oracle_candidates(text: str) -> tuple[Candidate, ...]:
    """The command line's `W:H,...` (an argparse type)."""
    try:
        return tuple(parse_candidate(part) for part in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def pick_oracle(
    results: dict[str, dict[str, Any]], candidates: tuple[Candidate, ...]
) -> dict[str, Any]:
    """Replace the `oracle@W:H` entries of `results` by one `oracle`: the cheapest candidate
    whose SLO attainment is at least reactive scaling's (the one of the highest attainment
    when none is; the cheapest when reactive was not run); returns the candidates' figures
    and the choice for the JSON."""
    cands = {c: results.pop(oracle_name(c)) for c in candidates if oracle_name(c) in results}
    if not cands:
        return {}
    ref = results.get("reactive", {}).get("slo_attainment")
    ok = [c for c in cands if ref is None or cands[c]["slo_attainment"] >= ref]
    if ok:
        chosen = min(ok, key=lambda c: cands[c]["gpu_hours"])
    else:
        chosen = max(cands, key=lambda c: cands[c]["slo_attainment"])
    results["oracle"] = cands[chosen]
    keep = ("gpu_hours", "slo_attainment", "scale_ups", "batch_missed")
    return {
        "oracle_smooth_min": chosen[0],
        "oracle_headroom": chosen[1],
        "oracle_variants": [
            {"smooth_min": w, "headroom": h, **{k: r[k] for k in keep}}
            for (w, h), r in cands.items()
        ],
    }
