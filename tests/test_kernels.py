"""LeanAttention and the split-KV baseline against a float64 reference.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton
is imported), where programs run one after another in program-id order: the stream-K merge must
finish on that schedule too.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.vllm_plugin.decode import decode_plan  # noqa: E402
from engines.vllm_plugin.layouts import cpu_cache_views, gpu_cache_views  # noqa: E402
from kernels import lean_attention as la  # noqa: E402
from kernels.inputs import TOLERANCES, PagedBatch, make_batch  # noqa: E402
from kernels.reference import decode_attention_reference  # noqa: E402
from kernels.split_kv import split_kv_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(got: torch.Tensor, batch: PagedBatch, dtype: torch.dtype) -> None:
    want = decode_attention_reference(*batch.args())
    assert not got.isnan().any(), f"unwritten (NaN) output elements, seed {batch.seed}"
    torch.testing.assert_close(
        got.double(), want, **TOLERANCES[dtype], msg=lambda m: f"seed {batch.seed}: {m}"
    )


def run_lean(batch: PagedBatch, **plan_kw: int) -> torch.Tensor:
    q = batch.query
    p = la.plan(
        batch.seq_lens.cpu(),
        num_q_heads=q.shape[1],
        num_kv_heads=batch.key_cache.shape[2],
        head_dim=q.shape[2],
        device=q.device,
        **plan_kw,
    )
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    la.run(p, *batch.args(), out=out)
    return out


CASES = [
    # (dtype, head_dim, q heads, kv heads, block size, programs)
    (torch.float32, 64, 4, 4, 16, 5),  # GQA 1, pairs split over several programs
    (torch.float16, 64, 8, 2, 16, 3),  # GQA 4, programs span pairs
    (torch.float16, 128, 8, 1, 32, 7),  # GQA 8, one KV head
    (torch.float32, 128, 16, 2, 16, 64),  # GQA 8, more programs than tiles
    (torch.float16, 64, 4, 1, 48, 1),  # one program walks everything
]


@pytest.mark.parametrize(("dtype", "head_dim", "hq", "hkv", "block_size", "programs"), CASES)
def test_lean_attention_matches_reference(
    dtype: torch.dtype, head_dim: int, hq: int, hkv: int, block_size: int, programs: int
) -> None:
    batch = make_batch(
        batch=4, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
        block_size=block_size, dtype=dtype, device=DEVICE,
    )  # fmt: skip
    assert_close(run_lean(batch, num_programs=programs), batch, dtype)


@pytest.mark.parametrize(("dtype", "hq", "hkv", "splits"), [
    (torch.float32, 4, 4, 3),
    (torch.float16, 8, 2, 4),
    (torch.float16, 16, 2, 1),
])  # fmt: skip
def test_split_kv_matches_reference(dtype: torch.dtype, hq: int, hkv: int, splits: int) -> None:
    batch = make_batch(
        batch=3, num_q_heads=hq, num_kv_heads=hkv, head_dim=64, block_size=16, dtype=dtype,
        device=DEVICE,
    )  # fmt: skip
    out = torch.full_like(batch.query, float("nan"))
    split_kv_attention(*batch.args(), num_splits=splits, out=out)
    assert_close(out, batch, dtype)


def test_plan_deals_tiles_evenly_and_covers_every_pair() -> None:
    lens = [1, 16, 17, 100, 250, 33]
    p = la.plan(lens, num_q_heads=8, num_kv_heads=2, head_dim=64, device="cpu",
                num_programs=7, block_n=16)  # fmt: skip
    starts = p.prog_tile_start.tolist()
    sizes = [b - a for a, b in itertools.pairwise(starts)]
    assert starts[0] == 0 and starts[-1] == p.total_tiles
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    want_tiles = sum(-(-n // 16) for n in lens) * 2
    assert p.total_tiles == want_tiles
    pair_starts = p.pair_tile_start.tolist()
    for pair in range(len(lens) * 2):
        owners = [
            prog for prog in range(p.num_programs)
            if starts[prog] < pair_starts[pair + 1] and starts[prog + 1] > pair_starts[pair]
        ]  # fmt: skip
        assert p.pair_first_prog[pair] == owners[0] and p.pair_nseg[pair] == len(owners)
    assert (p.pair_nseg > 1).any(), "the case must split some pair"


def test_replaying_a_plan_is_deterministic_and_resets_counters() -> None:
    batch = make_batch(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE)  # fmt: skip
    q = batch.query
    p = la.plan(batch.seq_lens.cpu(), num_q_heads=8, num_kv_heads=2, head_dim=64,
                device=q.device, num_programs=5)  # fmt: skip
    first = la.run(p, *batch.args())
    assert int(p.counters.abs().sum()) == 0
    second = la.run(p, *batch.args())
    assert torch.equal(first, second)
    assert_close(second, batch, torch.float32)


def test_plan_from_upper_bounds_of_the_lengths() -> None:
    """A plan may be made from lengths that overshoot (vLLM's host-side upper bounds): tiles
    and whole segments past a sequence's end contribute nothing."""
    batch = make_batch(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float32, device=DEVICE)  # fmt: skip
    over = (batch.seq_lens + 40).cpu()
    width = -(-int(over.max()) // 16)
    tables = torch.zeros(3, width, dtype=torch.int32, device=DEVICE)
    tables[:, : batch.block_tables.shape[1]] = batch.block_tables
    batch.block_tables = tables
    p = la.plan(over, num_q_heads=8, num_kv_heads=2, head_dim=64, device=DEVICE, num_programs=6)
    assert_close(la.run(p, *batch.args()), batch, torch.float32)


def test_kernel_reads_vllm_cpu_cache_in_place() -> None:
    """vLLM's CPU cache ("vec" layout): per page and KV head, keys as [head_dim, block_size],
    then values as [block_size, head_dim]."""
    batch = make_batch(batch=3, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=32,
                       dtype=torch.float32, device=DEVICE)  # fmt: skip
    k, v = batch.key_cache, batch.value_cache  # [blocks, block_size, heads, d]
    blocks, block_size, heads, d = k.shape
    keys_t = k.permute(0, 2, 3, 1).reshape(blocks, heads, d * block_size)  # [d, block_size]
    vals = v.permute(0, 2, 1, 3).reshape(blocks, heads, block_size * d)
    cache = torch.cat([keys_t, vals], dim=-1).view(blocks, heads, block_size, 2 * d)
    keys, values = cpu_cache_views(cache)
    assert torch.equal(keys, k) and torch.equal(values, v) and keys.stride(1) == 1
    batch.key_cache, batch.value_cache = keys, values
    assert_close(run_lean(batch, num_programs=4), batch, torch.float32)


def test_kernel_reads_vllm_gpu_cache_in_place() -> None:
    """vLLM's Triton backend: [blocks, heads, block_size, 2 * d] holding, per token and head,
    the key then the value."""
    batch = make_batch(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, device=DEVICE)  # fmt: skip
    k, v = batch.key_cache, batch.value_cache
    cache = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()
    keys, values = gpu_cache_views(cache, 64)
    assert torch.equal(keys, k) and torch.equal(values, v)
    batch.key_cache, batch.value_cache = keys, values
    assert_close(run_lean(batch, num_programs=3), batch, torch.float16)


def test_vllm_plans_only_batches_of_one_new_token_per_request() -> None:
    kw = {"num_q_heads": 8, "num_kv_heads": 2, "head_dim": 64, "device": torch.device("cpu")}
    lens = torch.tensor([5, 40, 7, 0], dtype=torch.int32)  # a padded slot past num_reqs
    p = decode_plan(max_query_len=1, num_actual_tokens=3, num_reqs=3, seq_lens_cpu=lens, **kw)
    assert p is not None and p.batch == 3 and p.max_seq_len == 40
    prefill = decode_plan(max_query_len=6, num_actual_tokens=8, num_reqs=3, seq_lens_cpu=lens,
                          **kw)  # fmt: skip
    assert prefill is None
    kw["head_dim"] = 96
    assert decode_plan(max_query_len=1, num_actual_tokens=3, num_reqs=3, seq_lens_cpu=lens,
                       **kw) is None  # fmt: skip


def test_one_call_wrapper_matches_reference() -> None:
    batch = make_batch(batch=2, num_q_heads=4, num_kv_heads=1, head_dim=128, block_size=16,
                       dtype=torch.float16, device=DEVICE)  # fmt: skip
    assert_close(la.lean_attention(*batch.args()), batch, torch.float16)


Args = list[torch.Tensor]


def good_args() -> Args:
    batch = make_batch(batch=2, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype=torch.float16, lens=[5, 20])  # fmt: skip
    return list(batch.args())


def both_caches(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Args], None]:
    def change(a: Args) -> None:
        a[1], a[2] = f(a[1]), f(a[2])

    return change


def one(index: int, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Args], None]:
    def change(a: Args) -> None:
        a[index] = f(a[index])

    return change


@pytest.mark.parametrize(("change", "error", "words"), [
    (one(0, lambda t: t[0]), ValueError, "query must have 3 dimensions"),
    (one(0, lambda t: t.float()), TypeError, "key_cache dtype"),
    (one(0, lambda t: t.double()), TypeError, "query dtype"),
    (one(0, lambda t: t[..., :48].contiguous()), ValueError, "head_dim must be one of"),
    (one(0, lambda t: t.repeat(1, 1, 2)[..., ::2]), ValueError, "query must be contiguous"),
    (one(0, lambda t: t[:, :3].contiguous()), ValueError, "multiple of num_kv_heads"),
    (both_caches(lambda t: t[:, :8].contiguous()), ValueError, "block_size must be >= 16"),
    (one(2, lambda t: t[:-1]), ValueError, "value_cache shape"),
    (both_caches(lambda t: t.repeat(1, 2, 1, 2)[:, ::2, :, ::2]), ValueError, "unit stride"),
    (one(3, lambda t: t.long()), TypeError, "block_tables must be int32"),
    (one(4, lambda t: t[:1]), ValueError, "batch 2 rows"),
])  # fmt: skip
def test_bad_inputs_get_clear_errors(
    change: Callable[[Args], None], error: type[Exception], words: str
) -> None:
    args = good_args()
    change(args)
    with pytest.raises(error, match=words):
        la.lean_attention(*args)
    with pytest.raises(error, match=words):
        split_kv_attention(*args)


def test_plan_and_run_reject_mismatches() -> None:
    args = good_args()
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        la.plan([3, 0], num_q_heads=4, num_kv_heads=2, head_dim=64, device="cpu")
    p = la.plan([5, 20], num_q_heads=4, num_kv_heads=1, head_dim=64, device="cpu")
    with pytest.raises(ValueError, match="plan"):
        la.run(p, *args)
    p = la.plan([5, 200], num_q_heads=4, num_kv_heads=2, head_dim=64, device="cpu")
    with pytest.raises(ValueError, match="fewer than the plan's longest"):
        la.run(p, *args)
    with pytest.raises(ValueError, match="out shape"):
        la.run(p, *args, out=args[0][:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on GPUs only")
@pytest.mark.parametrize("programs", [None, 3])
def test_bf16_on_gpu(programs: int | None) -> None:
    batch = make_batch(batch=5, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, longest=3000, device="cuda")  # fmt: skip
    kw = {} if programs is None else {"num_programs": programs}
    assert_close(run_lean(batch, **kw), batch, torch.bfloat16)
    assert_close(split_kv_attention(*batch.args()), batch, torch.bfloat16)
