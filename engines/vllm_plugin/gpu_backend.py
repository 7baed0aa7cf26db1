"""LeanAttention in vLLM's `CUSTOM` slot on GPUs (`--attention-backend CUSTOM`).

Extends vLLM's Triton backend, whose cache the kernel reads in place (layouts.py). Pure decode
batches of plain decoder layers go through LeanAttention; prefill, mixed batches and features
the kernel lacks through vLLM's Triton kernel. The plan is made per batch on the host from
vLLM's host-side upper bounds of the sequence lengths (no device sync), so full CUDA graphs are
declined; piecewise graphs, which run attention eagerly, are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from engines.vllm_plugin.decode import LeanDecode, decode_plan
from engines.vllm_plugin.layouts import gpu_cache_views
from kernels import lean_attention as la


@dataclass
class LeanTritonMetadata(TritonAttentionMetadata):
    lean_plan: la.LeanPlan | None = None


class LeanTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def build(
        self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False
    ) -> LeanTritonMetadata:
        meta = super().build(common_prefix_len, common_attn_metadata, fast_build)
        values = {f.name: getattr(meta, f.name) for f in fields(meta)}
        lens = getattr(common_attn_metadata, "seq_lens_cpu_upper_bound", None)
        plan = decode_plan(
            max_query_len=meta.max_query_len,
            num_actual_tokens=meta.num_actual_tokens,
            num_reqs=common_attn_metadata.num_reqs,
            seq_lens_cpu=meta.seq_lens.cpu() if lens is None else lens,
            num_q_heads=self.num_heads_q,
            num_kv_heads=self.num_heads_kv,
            head_dim=self.kv_cache_spec.head_size,
            device=meta.seq_lens.device,
        )
        return LeanTritonMetadata(**values, lean_plan=plan)


class LeanTritonImpl(LeanDecode, TritonAttentionImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_lean(
            self.attn_type == AttentionType.DECODER
            and self.alibi_slopes is None
            and self.sliding_window in (None, (-1, -1))
            and not self.logits_soft_cap
            and getattr(self, "sinks", None) is None
            and self.kv_cache_dtype == "auto"
        )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: LeanTritonMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        views = partial(gpu_cache_views, head_dim=self.head_size)
        if (
            output_scale is None
            and output_block_scale is None
            and self.lean_decode(layer, query, kv_cache, attn_metadata, output, views)
        ):
            return output
        result: torch.Tensor = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output,
            output_scale, output_block_scale,
        )  # fmt: skip
        return result


class LeanAttentionBackend(TritonAttentionBackend):
    """vLLM's Triton backend with decode through LeanAttention."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[LeanTritonImpl]:
        return LeanTritonImpl

    @staticmethod
    def get_builder_cls() -> type[LeanTritonMetadataBuilder]:
        return LeanTritonMetadataBuilder
