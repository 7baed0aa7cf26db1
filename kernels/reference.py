"""PyTorch reference for paged decode attention: the ground truth the kernels are tested against."""

from __future__ import annotations

import math

import torch

from kernels.checks import check_decode_inputs


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's keys or values, [seq_len, num_kv_heads, head_dim], in token order."""
    block_size = cache.shape[1]
    pages = block_table[: math.ceil(seq_len / block_size)].long()
    return cache[pages].flatten(0, 1)[:seq_len]


def decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Softmax(q K^T * scale) V per sequence and query head, computed in `dtype` (float64 by
    default) and returned in `dtype`. Same layout contract as the kernels."""
    shape = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens)
    scale = scale if scale is not None else 1.0 / math.sqrt(shape.head_dim)
    out = torch.empty(query.shape, dtype=dtype, device=query.device)
    for b, seq_len in enumerate(seq_lens.tolist()):
        k = gather_kv(key_cache, block_tables[b], seq_len).to(dtype)
        v = gather_kv(value_cache, block_tables[b], seq_len).to(dtype)
        # [kv_heads, group, d] against [kv_heads, seq, d]
        q = query[b].to(dtype).view(shape.num_kv_heads, shape.group, shape.head_dim)
        scores = torch.einsum("hgd,shd->hgs", q, k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hgs,shd->hgd", probs, v).reshape(shape.num_q_heads, -1)
    return out
