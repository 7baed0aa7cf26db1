"""Split-KV decode attention (FlashDecoding-style): the baseline LeanAttention is measured against.

The grid is (sequence x KV head, split): each program takes an equal share of its pair's tiles,
so the work per program follows each sequence's length, and a pair whose tiles do not divide by
the split count leaves some programs short or idle. A second kernel merges the splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.checks import check_decode_inputs
from kernels.lean_attention import LAUNCH_OPTIONS, default_block_n
from kernels.tiles import attend_tiles, load_query_group, merge_partial, store_output

DEFAULT_SPLITS = 16


@triton.jit
def _split_kv_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, num_kv_heads, group, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd, stride_btb,
    PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    split = tl.program_id(1)
    b = pair // num_kv_heads
    h = pair % num_kv_heads
    seq_len = tl.load(lens_ptr + b)
    tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(tiles, num_splits)
    lo = tl.minimum(split * per_split, tiles)
    hi = tl.minimum(lo + per_split, tiles)
    q = load_query_group(q_ptr, b, h, group, stride_qb, stride_qh, BLOCK_G, HEAD_DIM)
    # An empty split leaves m = -inf and l = 0, which the merge weighs as zero.
    acc, m_i, l_i = attend_tiles(
        q, k_ptr, v_ptr, bt_ptr + b * stride_btb, h, seq_len, lo, hi,
        qk_scale, stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        PAGE, BLOCK_G, BLOCK_N, HEAD_DIM, PRECISION,
    )  # fmt: skip
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    slot = pair * num_splits + split
    tl.store(part_acc_ptr + slot * BLOCK_G * HEAD_DIM + offs_g[:, None] * HEAD_DIM + offs_d, acc)
    tl.store(part_m_ptr + slot * BLOCK_G + offs_g, m_i)
    tl.store(part_l_ptr + slot * BLOCK_G + offs_g, l_i)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, num_kv_heads, group, num_splits,
    stride_ob, stride_oh, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    pair = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    rows = offs_g[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    base = pair * num_splits
    # Split 0 always holds the first tile, so m starts finite.
    acc = tl.load(part_acc_ptr + base * BLOCK_G * HEAD_DIM + rows)
    m_i = tl.load(part_m_ptr + base * BLOCK_G + offs_g)
    l_i = tl.load(part_l_ptr + base * BLOCK_G + offs_g)
    for s in range(1, num_splits):
        slot = base + s
        acc_j = tl.load(part_acc_ptr + slot * BLOCK_G * HEAD_DIM + rows)
        m_j = tl.load(part_m_ptr + slot * BLOCK_G + offs_g)
        l_j = tl.load(part_l_ptr + slot * BLOCK_G + offs_g)
        acc, m_i, l_i = merge_partial(acc, m_i, l_i, acc_j, m_j, l_j)
    b = pair // num_kv_heads
    h = pair % num_kv_heads
    store_output(out_ptr, acc, l_i, b, h, group, stride_ob, stride_oh, BLOCK_G, HEAD_DIM)


def split_kv_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_splits: int = DEFAULT_SPLITS,
    scale: float | None = None,
    block_n: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention with a fixed number of KV splits per (sequence, KV head) pair. Reads
    nothing on the host, so it can be captured in a CUDA graph as it is."""
    shape = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens, out)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_n = block_n or default_block_n(shape.head_dim)
    block_g = max(16, triton.next_power_of_2(shape.group))
    pairs = shape.batch * shape.num_kv_heads
    f32 = {"dtype": torch.float32, "device": query.device}
    part_acc = torch.empty(pairs * num_splits, block_g, shape.head_dim, **f32)
    part_m = torch.empty(pairs * num_splits, block_g, **f32)
    part_l = torch.empty(pairs * num_splits, block_g, **f32)
    if out is None:
        out = torch.empty_like(query)
    scale = scale if scale is not None else 1.0 / math.sqrt(shape.head_dim)
    _split_kv_kernel[(pairs, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, part_acc, part_m, part_l,
        scale * math.log2(math.e), shape.num_kv_heads, shape.group, num_splits,
        query.stride(0), query.stride(1), *key_cache.stride(), *value_cache.stride(),
        block_tables.stride(0),
        PAGE=shape.block_size, BLOCK_G=block_g, BLOCK_N=block_n, HEAD_DIM=shape.head_dim,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    _merge_splits_kernel[(pairs,)](
        part_acc, part_m, part_l, out, shape.num_kv_heads, shape.group, num_splits,
        out.stride(0), out.stride(1), BLOCK_G=block_g, HEAD_DIM=shape.head_dim,
    )  # fmt: skip
    return out
