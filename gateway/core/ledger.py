"""What the gateway has in flight per engine, and the snapshots policies decide on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    id: str
    region: str
    model: str
    healthy: bool
    running: int  # scraped from the engine (vllm:num_requests_running)
    waiting: int  # scraped (vllm:num_requests_waiting)
    kv_usage: float  # scraped (vllm:kv_cache_usage_perc), 0..1
    in_flight: int  # requests the gateway has open there now
    in_flight_prompt_tokens: int
    # Output tokens the gateway expects from what it has in flight there (predicted lengths).
    in_flight_decode_tokens: int = 0
    # Prompt tokens per second the gateway has sent there lately (exponentially decayed), as
    # of time `recent_prompt_at`: how much of the engine's time prefill takes.
    recent_prompt_rate: float = 0.0
    recent_prompt_at: float = 0.0
