"""LeanAttention: stream-K decode attention over vLLM's paged KV cache.

The KV tiles of all (sequence, KV head) pairs are numbered one after another, pair by pair, and
the total is dealt to a persistent grid in contiguous ranges whose sizes differ by at most one.
A program walks its range across pair boundaries. A pair that lies wholly inside one range is
finished by that program; a pair cut by range boundaries is computed in segments, one per
program that touches it. Each segment writes its fp32 partial (acc, m, l) to its own scratch
slot and then increments the pair's counter with acq_rel semantics; the program that brings the
counter to the pair's segment count is the last one, so every other partial is already visible
to it. It merges them in program order (deterministic whoever merges) and resets the counter.
No program ever waits for another, so no schedule can deadlock, including the interpreter's,
which runs programs one after another.

plan() does all host-side work once per batch (tile ranges, scratch, counters); run() checks
shapes and launches one kernel, so a CUDA graph can capture it. A plan's scratch belongs to one
stream at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.checks import HEAD_DIMS, check_decode_inputs, interpreted
from kernels.tiles import attend_tiles, load_query_group, merge_partial, store_output

PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 8
# Both attention kernels launch with these; three stages keep two K/V tiles in flight while one
# is consumed (about 39 KB of shared memory per program, see kernels/aot.py).
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 3}


@triton.jit
def _lean_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
    pair_tile_start_ptr, prog_tile_start_ptr, prog_pair_ptr, pair_first_prog_ptr, pair_nseg_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr, counter_ptr,
    qk_scale, num_kv_heads, group,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd, stride_btb, stride_ob, stride_oh,
    PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    range_lo = tl.load(prog_tile_start_ptr + pid)
    t_end = tl.load(prog_tile_start_ptr + pid + 1)
    pair = tl.load(prog_pair_ptr + pid)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    part_rows = offs_g[:, None] * HEAD_DIM + offs_d[None, :]
    t = range_lo
    while t < t_end:
        ps = tl.load(pair_tile_start_ptr + pair)
        pe = tl.load(pair_tile_start_ptr + pair + 1)
        seg_end = tl.minimum(pe, t_end)
        b = pair // num_kv_heads
        h = pair % num_kv_heads
        seq_len = tl.load(lens_ptr + b)
        q = load_query_group(q_ptr, b, h, group, stride_qb, stride_qh, BLOCK_G, HEAD_DIM)
        acc, m_i, l_i = attend_tiles(
            q, k_ptr, v_ptr, bt_ptr + b * stride_btb, h, seq_len, t - ps, seg_end - ps,
            qk_scale, stride_kb, stride_kt, stride_kh, stride_kd,
            stride_vb, stride_vt, stride_vh, stride_vd,
            PAGE, BLOCK_G, BLOCK_N, HEAD_DIM, PRECISION,
        )  # fmt: skip
        if (t == ps) & (seg_end == pe):
            store_output(out_ptr, acc, l_i, b, h, group, stride_ob, stride_oh, BLOCK_G, HEAD_DIM)
        else:
            # Slot 2*pid holds the segment that opens this program's range, 2*pid+1 the one
            # that closes it; no other segment of a range can be partial.
            slot = 2 * pid + (t != range_lo).to(tl.int32)
            tl.store(part_acc_ptr + slot * BLOCK_G * HEAD_DIM + part_rows, acc)
            tl.store(part_m_ptr + slot * BLOCK_G + offs_g, m_i)
            tl.store(part_l_ptr + slot * BLOCK_G + offs_g, l_i)
            # Every thread's stores happen before the counter moves (barrier, then release).
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pair, 1, sem="acq_rel")
            nseg = tl.load(pair_nseg_ptr + pair)
            if arrived == nseg - 1:
                tl.debug_barrier()
                first = tl.load(pair_first_prog_ptr + pair)
                first_lo = tl.load(prog_tile_start_ptr + first)
                m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_G], tl.float32)
                acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
                for j in range(0, nseg):
                    # The first program's segment closes its range unless the range starts
                    # exactly at the pair; every later program's segment opens its range.
                    s = 2 * (first + j) + ((j == 0) & (first_lo < ps)).to(tl.int32)
                    acc_j = tl.load(
                        part_acc_ptr + s * BLOCK_G * HEAD_DIM + part_rows, cache_modifier=".cg"
                    )
                    m_j = tl.load(part_m_ptr + s * BLOCK_G + offs_g, cache_modifier=".cg")
                    l_j = tl.load(part_l_ptr + s * BLOCK_G + offs_g, cache_modifier=".cg")
                    acc, m_i, l_i = merge_partial(acc, m_i, l_i, acc_j, m_j, l_j)
                store_output(
                    out_ptr, acc, l_i, b, h, group, stride_ob, stride_oh, BLOCK_G, HEAD_DIM
                )
                # Ready for the next run() with the same plan (CUDA graph replays).
                tl.atomic_xchg(counter_ptr + pair, 0)
        t = seg_end
        pair += 1


def default_block_n(head_dim: int) -> int:
    if interpreted():
        return 16
    return 64 if head_dim == 128 else 128


def default_num_programs(device: torch.device) -> int:
    """About two programs per SM; a fixed small grid under the interpreter."""
    if device.type == "cuda":
        sms: int = torch.cuda.get_device_properties(device).multi_processor_count
        return PROGRAMS_PER_SM * sms
    return INTERPRETER_PROGRAMS


@dataclass(frozen=True, slots=True)
class LeanPlan:
    """Host-computed schedule and device scratch for one batch; see plan()."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int
    block_n: int
    block_g: int
    num_programs: int
    total_tiles: int
    scale: float
    pair_tile_start: torch.Tensor  # [pairs + 1] first global tile of each pair
    prog_tile_start: torch.Tensor  # [programs + 1] first global tile of each program's range
    prog_pair: torch.Tensor  # [programs] pair holding each program's first tile
    pair_first_prog: torch.Tensor  # [pairs] first program touching the pair
    pair_nseg: torch.Tensor  # [pairs] programs touching the pair
    part_acc: torch.Tensor  # [2 * programs, block_g, head_dim] fp32
    part_m: torch.Tensor  # [2 * programs, block_g] fp32
    part_l: torch.Tensor  # [2 * programs, block_g] fp32
    counters: torch.Tensor  # [pairs] int32, zero between runs


def plan(
    seq_lens: Sequence[int] | torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device | str,
    num_programs: int | None = None,
    block_n: int | None = None,
    scale: float | None = None,
) -> LeanPlan:
    """Deal the batch's KV tiles evenly to the persistent grid. Runs on the host once per batch
    (seq_lens is read on the host); the result can be reused by any number of run() calls."""
    device = torch.device(device)
    lens = torch.as_tensor(seq_lens, dtype=torch.int64, device="cpu").flatten()
    if lens.numel() == 0:
        raise ValueError("seq_lens must not be empty")
    if int(lens.min()) < 1:
        raise ValueError(f"every seq_len must be >= 1, got {lens.tolist()}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads")
    block_n = block_n or default_block_n(head_dim)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    group = num_q_heads // num_kv_heads
    block_g = max(16, triton.next_power_of_2(group))

    tiles = torch.div(lens + block_n - 1, block_n, rounding_mode="floor")
    pair_tiles = tiles.repeat_interleave(num_kv_heads)
    pair_tile_start = torch.cat([torch.zeros(1, dtype=torch.int64), pair_tiles.cumsum(0)])
    total = int(pair_tile_start[-1])
    programs = min(num_programs or default_num_programs(device), total)
    if programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    # The first `total % programs` programs take one tile more than the rest.
    base, extra = divmod(total, programs)
    p = torch.arange(programs + 1, dtype=torch.int64)
    prog_tile_start = p * base + torch.clamp(p, max=extra)
    prog_pair = torch.searchsorted(pair_tile_start, prog_tile_start[:-1], right=True) - 1
    first = torch.searchsorted(prog_tile_start, pair_tile_start[:-1], right=True) - 1
    last = torch.searchsorted(prog_tile_start, pair_tile_start[1:] - 1, right=True) - 1

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.int32)

    f32 = {"dtype": torch.float32, "device": device}
    return LeanPlan(
        batch=lens.numel(),
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_seq_len=int(lens.max()),
        block_n=block_n,
        block_g=block_g,
        num_programs=programs,
        total_tiles=total,
        scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
        pair_tile_start=dev(pair_tile_start),
        prog_tile_start=dev(prog_tile_start),
        prog_pair=dev(prog_pair),
        pair_first_prog=dev(first),
        pair_nseg=dev(last - first + 1),
        part_acc=torch.empty(2 * programs, block_g, head_dim, **f32),
        part_m=torch.empty(2 * programs, block_g, **f32),
        part_l=torch.empty(2 * programs, block_g, **f32),
        counters=torch.zeros(pair_tiles.numel(), dtype=torch.int32, device=device),
    )


def run(
    p: LeanPlan,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel for a planned batch. seq_lens (on the device) must hold the values the
    plan was made from. Returns `out` (allocated when not given)."""
    shape = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens, out)
    planned = (p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim)
    got = (shape.batch, shape.num_q_heads, shape.num_kv_heads, shape.head_dim)
    if planned != got:
        raise ValueError(f"inputs have (batch, q heads, kv heads, head_dim) {got}, plan {planned}")
    if p.max_seq_len > shape.max_blocks * shape.block_size:
        raise ValueError(
            f"block_tables has {shape.max_blocks} columns of {shape.block_size} tokens, "
            f"fewer than the plan's longest sequence ({p.max_seq_len})"
        )
    if p.counters.device != query.device:
        raise ValueError(f"plan made for {p.counters.device}, inputs on {query.device}")
    if out is None:
        out = torch.empty_like(query)
    _lean_decode_kernel[(p.num_programs,)](
        query, key_cache, value_cache, block_tables, seq_lens, out,
        p.pair_tile_start, p.prog_tile_start, p.prog_pair, p.pair_first_prog, p.pair_nseg,
        p.part_acc, p.part_m, p.part_l, p.counters,
        p.scale * math.log2(math.e), shape.num_kv_heads, shape.group,
        query.stride(0), query.stride(1),
        *key_cache.stride(), *value_cache.stride(),
        block_tables.stride(0), out.stride(0), out.stride(1),
        PAGE=shape.block_size, BLOCK_G=p.block_g, BLOCK_N=p.block_n, HEAD_DIM=shape.head_dim,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out


def lean_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_programs: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """plan() and run() in one call (reads seq_lens on the host, so not graph-capturable)."""
    shape = check_decode_inputs(query, key_cache, value_cache, block_tables, seq_lens)
    p = plan(
        seq_lens.cpu(),
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        device=query.device,
        num_programs=num_programs,
        block_n=block_n,
        scale=scale,
    )
    return run(p, query, key_cache, value_cache, block_tables, seq_lens)
