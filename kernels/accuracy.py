"""Worst error of LeanAttention and the split-KV baseline against the float64 reference over many
fresh random batches: `TRITON_INTERPRET=1 python -m kernels.accuracy` on a CPU (fp16, fp32), or
plain `python -m kernels.accuracy` on a GPU (adds bf16)."""

from __future__ import annotations

import argparse
import random

import torch

from kernels import lean_attention as la
from kernels.inputs import TOLERANCES, make_batch
from kernels.reference import decode_attention_reference
from kernels.split_kv import split_kv_attention

GQA = ((4, 4), (8, 2), (16, 2))  # (query heads, KV heads): ratios 1, 4, 8


def worst_errors(dtype: torch.dtype, batches: int, device: str) -> tuple[float, float, int]:
    """Max abs error of (LeanAttention, split-KV) and the number of batches run."""
    rng = random.Random()
    lean_err = split_err = 0.0
    for i in range(batches):
        hq, hkv = GQA[i % len(GQA)]
        batch = make_batch(
            batch=rng.randint(1, 5), num_q_heads=hq, num_kv_heads=hkv,
            head_dim=rng.choice((64, 128)), block_size=rng.choice((16, 32)), dtype=dtype,
            device=device,
        )  # fmt: skip
        want = decode_attention_reference(*batch.args())
        programs = rng.randint(1, 12)
        lean = la.lean_attention(*batch.args(), num_programs=programs)
        split = split_kv_attention(*batch.args(), num_splits=rng.randint(1, 6))
        lean_err = max(lean_err, (lean.double() - want).abs().max().item())
        split_err = max(split_err, (split.double() - want).abs().max().item())
    return lean_err, split_err, batches


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=30, help="random batches per dtype")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cuda else [])
    print("| dtype | batches | LeanAttention max abs error | split-KV max abs error | atol |")
    print("|---|---|---|---|---|")
    for dtype in dtypes:
        lean, split, n = worst_errors(dtype, a.batches, device)
        name = str(dtype).removeprefix("torch.")
        atol = TOLERANCES[dtype]["atol"]
        print(f"| {name} | {n} | {lean:.2e} | {split:.2e} | {atol:.0e} |")


if __name__ == "__main__":
    main()
