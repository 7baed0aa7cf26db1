"""Input contract shared by every decode-attention entry point of this package.

Layout (vLLM's paged KV cache, one layer):
- query        [batch, num_q_heads, head_dim]               one new token per sequence
- key_cache    [num_blocks, block_size, num_kv_heads, head_dim]  any strides with a unit stride
               in head_dim (GPU layouts) or in block_size (vLLM's CPU layout keeps K transposed)
- value_cache  same shape as key_cache, same rule
- block_tables [batch, max_blocks_per_seq] int32             page ids, rows may be shuffled
- seq_lens     [batch] int32                                 tokens in the cache, new one included
Query head i reads KV head i // (num_q_heads // num_kv_heads), as in vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

HEAD_DIMS = (64, 128)
MIN_BLOCK_SIZE = 16


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    # The interpreter computes bf16 wrongly; fp32 on GPUs is allowed but only useful for tests.
    if device.type == "cuda":
        return (torch.float16, torch.bfloat16, torch.float32)
    return (torch.float16, torch.float32)


@dataclass(frozen=True, slots=True)
class DecodeShape:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    max_blocks: int

    @property
    def group(self) -> int:
        """Query heads that share one KV head (the GQA ratio)."""
        return self.num_q_heads // self.num_kv_heads


def _dims(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, strides {t.stride()}")


def _cache_strides(name: str, t: torch.Tensor) -> None:
    if t.stride(3) != 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} needs a unit stride in head_dim or in block_size, strides {t.stride()}"
        )
    if min(t.stride()) < 0:
        raise ValueError(f"{name} has negative strides {t.stride()}")


def check_decode_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor | None = None,
) -> DecodeShape:
    """Validate shapes, dtypes, devices and strides; raise ValueError or TypeError naming the
    argument. Reads no tensor data, so it is safe inside CUDA graph capture."""
    _dims("query", query, 3)
    _dims("key_cache", key_cache, 4)
    _dims("block_tables", block_tables, 2)
    _dims("seq_lens", seq_lens, 1)
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} != key_cache shape "
            f"{tuple(key_cache.shape)}"
        )
    batch, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, kv_head_dim = key_cache.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if kv_head_dim != head_dim:
        raise ValueError(f"key_cache head_dim {kv_head_dim} != query head_dim {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"block_size must be >= {MIN_BLOCK_SIZE}, got {block_size}")
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} "
            f"must have batch {batch} rows"
        )
    if block_tables.shape[1] == 0:
        raise ValueError("block_tables must have at least one column")
    dtypes = supported_dtypes(query.device)
    if query.dtype not in dtypes:
        raise TypeError(f"query dtype {query.dtype} not supported on {query.device}: {dtypes}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} dtype {t.dtype} != query dtype {query.dtype}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    _cache_strides("key_cache", key_cache)
    _cache_strides("value_cache", value_cache)
    tensors = {"query": query, "block_tables": block_tables, "seq_lens": seq_lens}
    if out is not None:
        if out.shape != query.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != query shape {tuple(query.shape)}")
        if out.dtype != query.dtype:
            raise TypeError(f"out dtype {out.dtype} != query dtype {query.dtype}")
        tensors["out"] = out
    for name, t in tensors.items():
        _last_dim_contiguous(name, t)
    for name, t in (tensors | {"key_cache": key_cache, "value_cache": value_cache}).items():
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    return DecodeShape(
        batch, num_q_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1]
    )
