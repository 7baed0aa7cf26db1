"""LeanAttention over vLLM's CPU attention backend (the `CPU_ATTN` slot).

The kernel reads vLLM's portable `vec` cache layout (block sizes that are a multiple of 32, no
AMX) in place through strided views (layouts.py); other layouts, prefill and features the
kernel lacks stay on vLLM's own kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from engines.vllm_plugin.decode import LeanDecode, decode_plan
from engines.vllm_plugin.layouts import cpu_cache_views
from kernels import lean_attention as la

PORTABLE_ISA = "vec"


@dataclass
class LeanCPUMetadata(CPUAttentionMetadata):
    lean_plan: la.LeanPlan | None = None


class LeanCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> LeanCPUMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        values = {f.name: getattr(meta, f.name) for f in fields(meta)}
        plan = None
        if self.isa == PORTABLE_ISA:
            plan = decode_plan(
                max_query_len=meta.max_query_len,
                num_actual_tokens=meta.num_actual_tokens,
                num_reqs=common_attn_metadata.num_reqs,
                seq_lens_cpu=meta.seq_lens,  # already on the host
                num_q_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                device=meta.seq_lens.device,
            )
        return LeanCPUMetadata(**values, lean_plan=plan)


class LeanCPUAttentionImpl(LeanDecode, CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_lean(
            self.attn_type == AttentionType.DECODER
            and self.alibi_slopes is None
            and self.sliding_window == -1
            and not self.logits_soft_cap
            and self.sinks is None
            and self.kv_cache_dtype == "auto"
        )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: LeanCPUMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (
            output_scale is None
            and output_block_scale is None
            and getattr(layer, "isa", None) == PORTABLE_ISA
            and self.lean_decode(layer, query, kv_cache, attn_metadata, output, cpu_cache_views)
        ):
            return output
        result: torch.Tensor = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output,
            output_scale, output_block_scale,
        )  # fmt: skip
        return result


class LeanCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU backend with decode through LeanAttention; keeps the name CPU_ATTN."""

    @staticmethod
    def get_impl_cls() -> type[LeanCPUAttentionImpl]:
        return LeanCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[LeanCPUMetadataBuilder]:
        return LeanCPUMetadataBuilder
