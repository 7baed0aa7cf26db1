"""Random paged decode batches for tests and accuracy runs: fresh each call, seed reported."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    seed: int
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.query, self.key_cache, self.value_cache, self.block_tables, self.seq_lens


def ragged_lens(rng: random.Random, batch: int, block_size: int, longest: int) -> list[int]:
    """Always a length of 1 and a length that is not a multiple of the block size."""
    lens = [1, block_size * 2 + 3] + [rng.randint(1, longest) for _ in range(batch - 2)]
    rng.shuffle(lens)
    return lens[:batch] if batch >= 2 else [block_size + 5]


def make_batch(
    *,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    longest: int = 90,
    lens: list[int] | None = None,
    device: str = "cpu",
) -> PagedBatch:
    """Pages are dealt to sequences in a shuffled order, with spare pages in the cache that no
    sequence owns, so a kernel reading the wrong page reads unrelated values."""
    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lens = lens or ragged_lens(rng, batch, block_size, longest)
    pages_per_seq = [-(-n // block_size) for n in lens]
    width = max(pages_per_seq) + 1
    num_blocks = sum(pages_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((batch, width), num_blocks + 99, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        block_tables[b, :n] = order[used : used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return PagedBatch(
        seed=seed,
        query=torch.randn(batch, num_q_heads, head_dim, generator=gen).to(device, dtype),
        key_cache=torch.randn(shape, generator=gen).to(device, dtype),
        value_cache=torch.randn(shape, generator=gen).to(device, dtype),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
    )


# Stated tolerances against the float64 reference (outputs are O(1)).
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 1e-2},
    torch.bfloat16: {"atol": 1.5e-2, "rtol": 2e-2},
}
