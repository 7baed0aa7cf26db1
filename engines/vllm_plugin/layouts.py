"""Views of vLLM's KV cache tensors in the kernel's layout, [num_blocks, block_size, kv_heads,
head_dim] for keys and for values, without copying. Both vLLM backends allocate one tensor of
[num_blocks, kv_heads, block_size, 2 * head_dim] per layer; what lies inside a page differs."""

from __future__ import annotations

import torch


def cpu_cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU backend, `vec` layout: per page and KV head, the keys transposed
    ([head_dim, block_size]), then the values ([block_size, head_dim])."""
    blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    page, head = kv_cache.stride(0), kv_cache.stride(1)
    shape = (blocks, block_size, heads, d)
    keys = kv_cache.as_strided(shape, (page, 1, head, block_size))
    values = kv_cache.as_strided(
        shape, (page, d, head, 1), kv_cache.storage_offset() + block_size * d
    )
    return keys, values


def gpu_cache_views(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's Triton backend: per token, the key then the value of each KV head."""
    pages = kv_cache.transpose(1, 2)
    return pages.narrow(-1, 0, head_dim), pages.narrow(-1, head_dim, head_dim)
