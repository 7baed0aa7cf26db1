"""Roofline performance model of one engine: a named GPU serving a named model.

A step of a continuously batched engine runs every scheduled token through the model once.
Its time is bounded below by compute (FLOPs / achievable FLOP/s) and by memory traffic
(bytes / achievable bandwidth); the roofline takes the larger and adds a fixed per-step cost
(scheduling, kernel launches, sampling). docs/ENGINE.md derives the equations and cites the
constants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Datasheet figures of one accelerator (dense bf16, no sparsity)."""

    name: str
    peak_flops: float  # FLOP/s, dense bf16 tensor cores
    hbm_bandwidth: float  # bytes/s
    memory_bytes: float


@dataclass(frozen=True, slots=True)
class ModelArch:
    """What the roofline needs to know of a decoder-only transformer."""

    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    max_model_len: int = 8192
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, every layer, every KV head.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("H100", peak_flops=989e12, hbm_bandwidth=3.35e12, memory_bytes=80e9),
        GpuSpec("H200", peak_flops=989e12, hbm_bandwidth=4.8e12, memory_bytes=141e9),
        GpuSpec("A100", peak_flops=312e12, hbm_bandwidth=2.039e12, memory_bytes=80e9),
    )
}

MODELS: dict[str, ModelArch] = {
    m.name: m
    for m in (
        ModelArch("llama-3.1-8b", 8.03e9, 32, 4096, 32, 8, 128),
        ModelArch("llama-3.1-70b", 70.6e9, 80, 8192, 64, 8, 128),
        ModelArch("mistral-7b", 7.24e9, 32, 4096, 32, 8, 128),
        ModelArch("qwen2.5-14b", 14.7e9, 48, 5120, 40, 8, 128),
    )
}


@dataclass(frozen=True, slots=True)
class Efficiency:
    """How close real kernels get to the datasheet, and the fixed cost of one step."""

    compute: float = 0.6  # model FLOPs utilisation reached by large prefill GEMMs
    bandwidth: float = 0.8  # share of HBM bandwidth reached by decode GEMVs and attention
    step_overhead_s: float = 0.0015  # scheduler, launches, sampling, detokenisation
    gpu_memory_utilization: float = 0.9  # vLLM's default share of memory it may use
    activation_reserve_bytes: float = 2e9  # activations and CUDA graphs, per GPU


@dataclass(frozen=True, slots=True)
class SeqWork:
    """One sequence's share of a step: `new_tokens` computed on top of `cached_tokens`."""

    cached_tokens: int
    new_tokens: int


@dataclass(frozen=True, slots=True)
class PerfModel:
    """Step-time and capacity model of one engine (`tp` GPUs with tensor parallelism)."""

    gpu: GpuSpec
    model: ModelArch
    tp: int = 1
    eff: Efficiency = Efficiency()

    @classmethod
    def named(cls, gpu: str, model: str, tp: int = 1) -> PerfModel:
        """Look up presets by name; raises KeyError naming the unknown one."""
        if gpu not in GPUS:
            raise KeyError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPUS))}")
        if model not in MODELS:
            raise KeyError(f"unknown model {model!r}; known: {', '.join(sorted(MODELS))}")
        return cls(GPUS[gpu], MODELS[model], tp)

    @property
    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens that fit once weights and activations have their memory."""
        usable = self.gpu.memory_bytes * self.eff.gpu_memory_utilization * self.tp
        free = usable - self.model.weight_bytes - self.eff.activation_reserve_bytes * self.tp
        if free <= 0:
            return 0
        return int(free // self.model.kv_bytes_per_token)

    def step_time(self, work: Iterable[SeqWork]) -> float:
        """Seconds for one forward pass over every sequence's new tokens."""
        tokens = 0
        attn_pairs = 0.0  # sum over new tokens of the context each one attends to
        kv_read = 0
        for w in work:
            n, c = w.new_tokens, w.cached_tokens
            tokens += n
            # Token i of the chunk attends to c + i + 1 positions (causal).
            attn_pairs += n * c + n * (n + 1) / 2
            kv_read += c + n
        return self.step_time_totals(tokens, attn_pairs, kv_read)

    def step_time_totals(self, tokens: int, attn_pairs: float, kv_read: int) -> float:
        """`step_time` from a step's totals: new tokens, (new token, attended position) pairs
        and KV tokens read. Routers use it to price a hypothetical step in O(1)."""
        if tokens <= 0:
            return 0.0
        m = self.model
        # 2 FLOPs per weight per token for the GEMMs; QK^T and PV cost 2 * 2 * head_dim per
        # (query head, attended position) per layer.
        flops = 2.0 * m.params * tokens + 4.0 * m.layers * m.heads * m.head_dim * attn_pairs
        # Weights are read once per step; each sequence's KV is read once per layer pass and
        # the new tokens' KV written once.
        bytes_moved = m.weight_bytes + (kv_read + tokens) * m.kv_bytes_per_token
        t_compute = flops / (self.gpu.peak_flops * self.eff.compute * self.tp)
        t_memory = bytes_moved / (self.gpu.hbm_bandwidth * self.eff.bandwidth * self.tp)
        return max(t_compute, t_memory) + self.eff.step_overhead_s

    def decode_step_time(self, batch: int, mean_context: int) -> float:
        """Convenience for a pure decode step of `batch` sequences."""
        return self.step_time(SeqWork(mean_context, 1) for _ in range(batch))


@dataclass(slots=True)
class DecodeRun:
    """`steps` pure decode steps of `batch` sequences holding `cached` KV tokens in all when
    the run starts at `t0`. Step j (1-based) reads cached + j x batch KV tokens, so its compute
    and memory times are each linear in j and its time is the larger plus the fixed cost:
    `PerfModel.step_time_totals` summed in closed form, so a run of any length costs O(1)."""

    t0: float
    steps: int
    batch: int
    # Step j's compute time is c0 + c1 j, its memory time m0 + m1 j; `over` is the fixed cost.
    c0: float
    c1: float
    m0: float
    m1: float
    over: float

    @classmethod
    def plan(cls, perf: PerfModel, t0: float, steps: int, batch: int, cached: int) -> DecodeRun:
        m, g, eff = perf.model, perf.gpu, perf.eff
        flops_s = g.peak_flops * eff.compute * perf.tp
        bytes_s = g.hbm_bandwidth * eff.bandwidth * perf.tp
        attn = 4.0 * m.layers * m.heads * m.head_dim
        kv = m.kv_bytes_per_token
        # pairs = kv_read = cached + j x batch (one new token each, attending to all before it)
        c0 = (2.0 * m.params * batch + attn * cached) / flops_s
        c1 = attn * batch / flops_s
        m0 = (m.weight_bytes + (cached + batch) * kv) / bytes_s
        m1 = kv * batch / bytes_s
        return cls(t0, steps, batch, c0, c1, m0, m1, eff.step_overhead_s)

    def elapsed(self, n: int) -> float:
        """Seconds for the run's first `n` steps."""
        if n <= 0:
            return 0.0
        # max(c, m) of two lines: the memory line leads while j < cross (decode is memory
        # bound until the context grows), the compute line after, or one leads throughout.
        if self.c1 == self.m1:
            cross = 0 if self.c0 >= self.m0 else n
        else:
            cross = min(n, max(0, math.floor((self.m0 - self.c0) / (self.c1 - self.m1))))
            if self.c1 < self.m1:  # compute leads first, memory after
                k = min(n, max(0, math.floor((self.c0 - self.m0) / (self.m1 - self.c1))))
                return _line(self.c0, self.c1, 0, k) + _line(self.m0, self.m1, k, n) + n * self.over
        return _line(self.m0, self.m1, 0, cross) + _line(self.c0, self.c1, cross, n) + n * self.over

    def end(self) -> float:
        return self.t0 + self.elapsed(self.steps)

    def steps_by(self, t: float) -> int:
        """Steps ended by time `t`, the one in progress at `t` counted as ended (the smallest
        n whose end is at or after `t`)."""
        lo, hi = 1, self.steps
        while lo < hi:
            mid = (lo + hi) // 2
            if self.t0 + self.elapsed(mid) >= t:
                hi = mid
            else:
                lo = mid + 1
        return lo


def _line(a: float, b: float, lo: int, hi: int) -> float:
    """Sum of a + b j over j = lo + 1 .. hi."""
    if hi <= lo:
        return 0.0
    return a * (hi - lo) + b * (hi * (hi + 1) - lo * (lo + 1)) / 2
