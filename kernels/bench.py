"""Decode attention benchmark: LeanAttention against the split-KV baseline, FlashAttention-2
(PyTorch SDPA's flash backend on contiguous KV), FlashInfer and vLLM's decode kernel where they
import, and against the bandwidth floor (KV bytes over the copy bandwidth measured in the run).

    python -m kernels.bench                 on an NVIDIA GPU: the full grid, writes docs/KERNELS.md
    python -m kernels.bench --dry-run       anywhere: tiny shapes, every path once, nothing written

Every shape uses fresh random bf16 inputs with shuffled block tables, enough copies of the KV
cache to be several times the L2 size (the runs cycle through them, so no run finds its KV in
L2), warm-up runs, then the median of many timed runs. Outputs are checked against LeanAttention
before anything is timed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

KERNELS_MD = Path(__file__).resolve().parent.parent / "docs" / "KERNELS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
GPU_GRID = {"batches": (1, 4, 16, 64), "contexts": (1024, 8192, 32768, 131072, 524288)}
DRY_GRID = {"batches": (1, 2), "contexts": (40,)}
L2_COPIES = 4  # KV bytes per shape at least this many times the L2 size
MEMORY_SHARE = 0.8  # of free device memory that one shape may use
SPLITS = 16  # the split-KV baseline's fixed split count
GRAPH_RUNS = 10  # runs per CUDA graph replay, at least


@dataclass(frozen=True)
class Setup:
    device: torch.device
    dtype: torch.dtype
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    warmup: int
    runs: int


@dataclass
class Shape:
    batch: int
    context: int
    copies: int
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    tables: list[torch.Tensor]  # one block table per copy of the KV cache
    seq_lens: torch.Tensor
    contiguous_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # [B, Hkv, ctx, D] per copy

    @property
    def kv_bytes(self) -> int:
        """Bytes one decode step must read: K and V of every token, head and sequence."""
        _, _, heads, dim = self.key_cache.shape
        return 2 * self.batch * self.context * heads * dim * self.key_cache.element_size()


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 0  # the dry run needs one copy only


def make_shape(s: Setup, batch: int, context: int, with_contiguous: bool) -> Shape | None:
    """Random inputs for one shape, or None when they do not fit in memory."""
    per_copy = 2 * batch * context * s.kv_heads * s.head_dim * torch.finfo(s.dtype).bits // 8
    copies = max(1, math.ceil(L2_COPIES * l2_bytes(s.device) / per_copy))
    if s.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(s.device)
        budget = MEMORY_SHARE * free
        if per_copy * copies > budget:
            return None
        with_contiguous = with_contiguous and 2 * per_copy * copies <= budget
    pages = -(-context // s.block_size)
    num_blocks = pages * batch * copies
    shape = (num_blocks, s.block_size, s.kv_heads, s.head_dim)
    key_cache = torch.randn(shape, device=s.device, dtype=s.dtype)
    value_cache = torch.randn(shape, device=s.device, dtype=s.dtype)
    order = torch.randperm(num_blocks, device=s.device).to(torch.int32)
    tables = list(order.view(copies, batch, pages).unbind(0))
    contiguous = None
    if with_contiguous:
        contiguous = [(contiguous_kv(key_cache, t, context), contiguous_kv(value_cache, t, context))
                      for t in tables]  # fmt: skip
    return Shape(
        batch=batch,
        context=context,
        copies=copies,
        query=torch.randn(batch, s.q_heads, s.head_dim, device=s.device, dtype=s.dtype),
        key_cache=key_cache,
        value_cache=value_cache,
        tables=tables,
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=s.device),
        contiguous_kv=contiguous,
    )


def contiguous_kv(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """The paged cache's sequences as [batch, kv_heads, context, head_dim], one at a time."""
    from kernels.reference import gather_kv

    batch, (_, _, heads, dim) = tables.shape[0], cache.shape
    out = torch.empty(batch, heads, context, dim, device=cache.device, dtype=cache.dtype)
    for b in range(batch):
        out[b] = gather_kv(cache, tables[b], context).transpose(0, 1)
    return out


Runner = Callable[[int], torch.Tensor]  # copy index -> output [B, Hq, D]


def runners(s: Setup, sh: Shape) -> dict[str, Runner | str]:
    """Each contender as a function of the KV copy to read, or a reason why it is missing."""
    from kernels import lean_attention as la
    from kernels.split_kv import split_kv_attention

    out: dict[str, Runner | str] = {}
    plan = la.plan(sh.seq_lens.cpu(), num_q_heads=s.q_heads, num_kv_heads=s.kv_heads,
                   head_dim=s.head_dim, device=s.device)  # fmt: skip
    args = (sh.query, sh.key_cache, sh.value_cache)
    out["LeanAttention"] = lambda c: la.run(plan, *args, sh.tables[c], sh.seq_lens)
    out[f"split-KV ({SPLITS})"] = lambda c: split_kv_attention(
        *args, sh.tables[c], sh.seq_lens, num_splits=SPLITS
    )
    out["FA2 (SDPA flash)"] = sdpa_runner(s, sh)
    out["FlashInfer"] = guarded(lambda: flashinfer_runner(s, sh))
    out["vLLM FA"] = guarded(lambda: vllm_runner(s, sh))
    return out


def guarded(make: Callable[[], Runner]) -> Runner | str:
    try:
        return make()
    except Exception as e:  # an optional library missing or refusing the shape
        return f"n/a ({type(e).__name__})"


def sdpa_runner(s: Setup, sh: Shape) -> Runner | str:
    if sh.contiguous_kv is None:
        return "n/a (memory)"
    kv = sh.contiguous_kv
    group = s.q_heads // s.kv_heads
    # A decode query group attends to its KV head like G query rows of one head.
    q = sh.query.view(sh.batch, s.kv_heads, group, s.head_dim)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if s.device.type == "cuda" else SDPBackend.MATH
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(c: int) -> torch.Tensor:
        with sdpa_kernel(backend):
            return sdpa(q, kv[c][0], kv[c][1]).reshape(sh.batch, s.q_heads, s.head_dim)

    return run


def flashinfer_runner(s: Setup, sh: Shape) -> Runner:
    import flashinfer  # type: ignore[import-not-found]

    pages = sh.tables[0].shape[1]
    # Each wrapper keeps its plan in its workspace, so every copy gets one.
    size = max(32 << 20, (256 << 20) // sh.copies)
    indptr = torch.arange(sh.batch + 1, dtype=torch.int32, device=s.device) * pages
    last = torch.full((sh.batch,), sh.context - (pages - 1) * s.block_size, dtype=torch.int32,
                      device=s.device)  # fmt: skip
    wrappers = []
    for table in sh.tables:
        workspace = torch.empty(size, dtype=torch.uint8, device=s.device)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        w.plan(indptr, table.flatten(), last, s.q_heads, s.kv_heads, s.head_dim,
               s.block_size, q_data_type=s.dtype, kv_data_type=s.dtype)  # fmt: skip
        wrappers.append(w)
    kv = (sh.key_cache, sh.value_cache)
    return lambda c: wrappers[c].run(sh.query, kv)


def vllm_runner(s: Setup, sh: Shape) -> Runner:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    cu_q = torch.arange(sh.batch + 1, dtype=torch.int32, device=s.device)
    return lambda c: flash_attn_varlen_func(
        sh.query, sh.key_cache, sh.value_cache, max_seqlen_q=1, cu_seqlens_q=cu_q,
        max_seqlen_k=sh.context, seqused_k=sh.seq_lens, block_table=sh.tables[c], causal=True,
    )  # fmt: skip


def median_seconds(s: Setup, fn: Runner, copies: int) -> float:
    """Median seconds per run over s.runs timings after s.warmup runs, cycling through the KV
    copies. On a GPU each timing replays a CUDA graph of at least GRAPH_RUNS runs, so the
    host's launch overhead (Python argument checks included) is not counted; a contender that
    cannot be captured is timed eagerly, one run per timing."""
    for i in range(s.warmup):
        fn(i % copies)
    if s.device.type != "cuda":
        times = []
        for i in range(s.runs):
            t0 = time.perf_counter()
            fn(i % copies)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    per_replay = max(copies, GRAPH_RUNS)
    graph: torch.cuda.CUDAGraph | None = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(per_replay):
                fn(i % copies)
    except Exception:
        graph, per_replay = None, 1
    times = []
    for i in range(s.runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is None:
            fn(i % copies)
        else:
            graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / per_replay)
    return statistics.median(times)


def copy_bandwidth(s: Setup) -> float:
    """Device-to-device copy bandwidth in bytes/s (read plus write) over a buffer far larger
    than L2."""
    n = max(64 * l2_bytes(s.device), 1 << 24) if s.device.type == "cuda" else 1 << 24
    src = torch.empty(n, dtype=torch.uint8, device=s.device)
    dst = torch.empty_like(src)
    t = median_seconds(s, lambda _: dst.copy_(src), 1)
    return 2 * n / t


def measure(s: Setup, grid: dict[str, tuple[int, ...]]) -> tuple[float, list[dict[str, object]]]:
    bw = copy_bandwidth(s)
    rows: list[dict[str, object]] = []
    for context in grid["contexts"]:
        for batch in grid["batches"]:
            try:
                sh = make_shape(s, batch, context, with_contiguous=True)
            except torch.OutOfMemoryError:
                sh = None
            if sh is None:
                print(f"skip batch {batch} context {context}: does not fit in memory")
                continue
            row: dict[str, object] = {"batch": batch, "context": context}
            row["floor_us"] = sh.kv_bytes / bw * 1e6
            contenders = runners(s, sh)
            want = contenders["LeanAttention"](0).float()  # type: ignore[operator]
            for name, fn in contenders.items():
                if isinstance(fn, str):
                    row[name] = fn
                    continue
                got = fn(0).float().view_as(want)
                # Long contexts average many values into small outputs: scale the tolerance.
                if not (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-4:  # NaN fails
                    row[name] = "n/a (mismatch)"
                    continue
                row[name] = median_seconds(s, fn, sh.copies) * 1e6
            rows.append(row)
            print(format_row(row), flush=True)
            del sh, contenders
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
    return bw, rows


NAMES = ["LeanAttention", f"split-KV ({SPLITS})", "FA2 (SDPA flash)", "FlashInfer", "vLLM FA"]


def cell(v: object) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def format_row(row: dict[str, object]) -> str:
    lean = row["LeanAttention"]
    share = f"{row['floor_us'] / lean:.0%}" if isinstance(lean, float) else "-"  # type: ignore[operator]
    cells = [str(row["batch"]), str(row["context"]), cell(row["floor_us"])]
    return "| " + " | ".join([*cells, *(cell(row.get(n, "-")) for n in NAMES), share]) + " |"


def summary(rows: list[dict[str, object]], kv_heads: int, sms: int) -> list[str]:
    def ratio(row: dict[str, object], other: str) -> float | None:
        a, b = row["LeanAttention"], row.get(other)
        return b / a if isinstance(a, float) and isinstance(b, float) else None

    long_rows = [r for r in rows if r["context"] >= 32768 and r["batch"] * kv_heads < sms]  # type: ignore[operator]
    lines = []
    for label, values in (
        ("bandwidth share", [r["floor_us"] / r["LeanAttention"] for r in long_rows
                             if isinstance(r["LeanAttention"], float)]),  # type: ignore[operator]
        ("speed-up over split-KV", [x for r in long_rows if (x := ratio(r, NAMES[1]))]),
        ("speed-up over FA2", [x for r in long_rows if (x := ratio(r, NAMES[2]))]),
    ):  # fmt: skip
        if values:
            lines.append(f"- long context, batch x KV heads < {sms} SMs: mean {label} "
                         f"{statistics.fmean(values):.2f} over {len(values)} shapes")  # fmt: skip
    worst = [x for r in rows if (x := ratio(r, NAMES[1]))]
    if worst:
        lines.append(f"- every shape: worst LeanAttention / split-KV speed ratio {min(worst):.2f}")
    return lines


def render(device: str, bw: float, rows: list[dict[str, object]], s: Setup, sms: int) -> str:
    head = ["batch", "context", "floor us", *(f"{n} us" for n in NAMES), "Lean share of floor"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += [format_row(r) for r in rows]
    return "\n".join([
        f"{device}, `make bench-kernels`: {s.q_heads} query and {s.kv_heads} KV "
        f"heads, head dim {s.head_dim}, {str(s.dtype).removeprefix('torch.')}, block size "
        f"{s.block_size}, median of {s.runs} runs after {s.warmup} warm-up runs; copy "
        f"bandwidth {bw / 1e9:.0f} GB/s.",
        "",
        *table,
        "",
        *summary(rows, s.kv_heads, sms),
    ])  # fmt: skip


def write_section(path: Path, text: str) -> None:
    doc = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on any device")
    ap.add_argument("--out", type=Path, default=KERNELS_MD, help="document to update")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.dry_run and not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not cuda:
        raise SystemExit("no CUDA device: run with --dry-run, or on an NVIDIA GPU")
    device = torch.device("cuda" if cuda else "cpu")
    if a.dry_run:  # every code path once, small enough for the interpreter
        s = Setup(device, torch.bfloat16 if cuda else torch.float16, 8, 2, 64, 16, 1, 2)
    else:
        s = Setup(device, torch.bfloat16, 32, 8, 128, 16, warmup=10, runs=50)
    grid = DRY_GRID if a.dry_run else GPU_GRID
    name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 8
    bw, rows = measure(s, grid)
    text = render(name, bw, rows, s, sms)
    print(text)
    if not a.dry_run:
        write_section(a.out, text)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
