"""What one engine sustains at the latency SLO, from the roofline performance model.

The plan needs one figure per (model, GPU type): prompt tokens per second an engine can take
while every running sequence still decodes within the time-per-output-token SLO. In steady
state a continuously batched engine holds `batch` sequences; each step decodes one token of
each and prefills `prompt / output` tokens per sequence on average (chunked prefill spreads
each prompt over its sequence's decode steps). The largest batch whose step time meets the
SLO, and whose KV cache fits, sets the throughput.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.perf_model import PerfModel
from planner.problem import EngineType


@dataclass(frozen=True, slots=True)
class RequestShape:
    """Mean token counts of the traffic a model serves."""

    prompt_tokens: float
    output_tokens: float

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0 or self.output_tokens < 1:
            raise ValueError(
                f"prompt_tokens must be >= 0 and output_tokens >= 1, got {self.prompt_tokens}, "
                f"{self.output_tokens}"
            )


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """Steady state at the SLO; every rate is 0 when the engine cannot meet it at all."""

    batch: int
    step_s: float
    requests_per_s: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float


def capacity_at_slo(
    perf: PerfModel, shape: RequestShape, tpot_slo_s: float, max_num_seqs: int = 256
) -> EngineCapacity:
    """The largest steady batch whose step time is within `tpot_slo_s` and whose KV fits."""
    if tpot_slo_s <= 0 or max_num_seqs < 1:
        raise ValueError(f"tpot_slo_s and max_num_seqs must be > 0, got {tpot_slo_s}")
    p, o = shape.prompt_tokens, shape.output_tokens
    # A sequence holds its prompt and, by the end, all its output in the KV cache.
    kv_limit = int(perf.kv_capacity_tokens // (p + o))
    hi = min(max_num_seqs, kv_limit)
    # Step time grows with the batch, so the largest batch within the SLO is found by bisection.
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if _step_s(perf, shape, mid) <= tpot_slo_s:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best == 0:
        return EngineCapacity(0, 0.0, 0.0, 0.0, 0.0)
    step = _step_s(perf, shape, best)
    rps = best / (o * step)
    return EngineCapacity(best, step, rps, rps * p, rps * o)


def _step_s(perf: PerfModel, shape: RequestShape, batch: int) -> float:
    p, o = shape.prompt_tokens, shape.output_tokens
    context = p + o / 2  # mean context of a decoding sequence over its life
    prefill = batch * p / o
    # Decode tokens attend to their context; a prompt's tokens attend causally to each other,
    # p (p + 1) / 2 pairs per prompt, spread over its o steps.
    attn_pairs = batch * context + batch * p * (p + 1) / 2 / o
    return perf.step_time_totals(
        tokens=max(1, round(batch + prefill)),
        attn_pairs=attn_pairs,
        kv_read=round(batch * context),
    )


def engine_type(
    model: str,
    gpu: str,
    shape: RequestShape,
    tpot_slo_s: float,
    startup_min: float,
    tp: int = 1,
    arch: str | None = None,
) -> EngineType:
    """The plan's view of `model` served on `tp` GPUs of type `gpu` (perf-model presets;
    `arch` names the preset when the served model's name differs)."""
    perf = PerfModel.named(gpu, arch or model, tp)
    cap = capacity_at_slo(perf, shape, tpot_slo_s)
    if cap.batch == 0:
        raise ValueError(
            f"{model} on {tp} x {gpu} cannot meet a {tpot_slo_s * 1000:g} ms TPOT SLO "
            f"(KV room for {perf.kv_capacity_tokens} tokens)"
        )
    return EngineType(
        model=model,
        gpu=gpu,
        gpus=tp,
        tokens_per_s=cap.prompt_tokens_per_s,
        startup_min=startup_min,
    )
