"""What the CPU and GPU backends share: which batches go through LeanAttention, and the launch.
Free of vLLM imports; vLLM's objects arrive as arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engines.vllm_plugin.calls import LaunchLog
from kernels import lean_attention as la
from kernels.checks import HEAD_DIMS

CacheViews = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decode_plan(
    *,
    max_query_len: int,
    num_actual_tokens: int,
    num_reqs: int,
    seq_lens_cpu: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
) -> la.LeanPlan | None:
    """A plan for a batch of one new token per request, else None (prefill, mixed batches,
    head dims the kernel lacks). Made once per batch by the metadata builder, shared by every
    layer."""
    if max_query_len != 1 or num_actual_tokens != num_reqs or head_dim not in HEAD_DIMS:
        return None
    return la.plan(
        seq_lens_cpu[:num_reqs],
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        device=device,
    )


class LeanDecode:
    """Mixin for a vLLM attention impl, listed before it in the bases; the impl provides
    num_heads and head_size."""

    num_heads: int
    head_size: int

    def init_lean(self, capable: bool) -> None:
        """`capable`: the layer uses nothing the kernel lacks (sliding window, ALiBi, soft cap,
        sinks, quantised KV, encoder attention); otherwise it always stays on vLLM's kernel."""
        self.lean_capable = capable
        self.launches = LaunchLog()

    def lean_decode(
        self,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        views: CacheViews,
    ) -> bool:
        """Run the batch through LeanAttention if its metadata carries a plan; True if it did."""
        plan: la.LeanPlan | None = getattr(attn_metadata, "lean_plan", None)
        if plan is None or not self.lean_capable:
            return False
        n: int = attn_metadata.num_actual_tokens
        keys, values = views(kv_cache)
        la.run(
            plan,
            query[:n],
            keys,
            values,
            attn_metadata.block_table[:n],
            attn_metadata.seq_lens[:n],
            out=output[:n].view(n, self.num_heads, self.head_size),
        )
        self.launches.record(str(getattr(layer, "layer_name", "?")), n, plan.num_programs)
        return True
