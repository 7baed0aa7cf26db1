"""Triton building blocks shared by the LeanAttention and split-KV decode kernels.

A KV tile is BLOCK_N consecutive tokens of one (sequence, KV head) pair. The GQA group's query
heads are packed into the BLOCK_G rows of one tile, so each K and V tile is read once for the
whole group. Scores are kept in base 2 (the scale is pre-multiplied by log2(e)), and partial
results are (acc, m, l): the unnormalised output, the running max and the running sum of
exp2(score - m). Two partials of the same pair combine associatively:
    m = max(m1, m2); l = l1 * 2^(m1-m) + l2 * 2^(m2-m); acc = acc1 * 2^(m1-m) + acc2 * 2^(m2-m)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _finite_or_zero(m):
    # A row that has seen no token yet keeps m = -inf; exp2(-inf - 0) = 0 weighs it out
    # where exp2(-inf - -inf) would be NaN.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def load_query_group(
    q_ptr, b, h, group, stride_qb, stride_qh, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """Rows g < group of sequence b's query heads h*group + g; padded rows are zero."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = q_ptr + b * stride_qb + (h * group + offs_g)[:, None] * stride_qh + offs_d[None, :]
    return tl.load(ptrs, mask=(offs_g < group)[:, None], other=0.0)


@triton.jit
def attend_tiles(
    q,
    k_ptr,
    v_ptr,
    bt_row_ptr,
    h,
    seq_len,
    tile_lo,
    tile_hi,
    qk_scale,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of the query group over tiles [tile_lo, tile_hi) of one pair.

    Returns (acc, m, l) in fp32. Tiles past seq_len contribute nothing (a plan made from upper
    bounds of the lengths stays correct); a row that saw no token ends with m = -inf, l = 0.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for tile in range(tile_lo, tile_hi):
        tok = tile * BLOCK_N + offs_n
        valid = tok < seq_len
        # Page ids of each token; int64 because page * stride overflows int32 on large caches.
        page = tl.load(bt_row_ptr + tok // PAGE, mask=valid, other=0).to(tl.int64)
        slot = tok % PAGE
        k_off = page * stride_kb + slot * stride_kt + h * stride_kh
        k = tl.load(
            k_ptr + k_off[:, None] + offs_d[None, :] * stride_kd, mask=valid[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = _finite_or_zero(m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off = page * stride_vb + slot * stride_vt + h * stride_vh
        v = tl.load(
            v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd, mask=valid[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def store_output(
    out_ptr,
    acc,
    l_i,
    b,
    h,
    group,
    stride_ob,
    stride_oh,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Normalise and store the group's rows g < group."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = out_ptr + b * stride_ob + (h * group + offs_g)[:, None] * stride_oh + offs_d[None, :]
    out = acc / l_i[:, None]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_g < group)[:, None])


@triton.jit
def merge_partial(acc, m_i, l_i, acc_j, m_j, l_j):
    """Combine two partial results of the same pair (see the module docstring)."""
    m_new = tl.maximum(m_i, m_j)
    m_ref = _finite_or_zero(m_new)
    a = tl.exp2(m_i - m_ref)
    c = tl.exp2(m_j - m_ref)
    return acc * a[:, None] + acc_j * c[:, None], m_new, l_i * a + l_j * c
