"""Decode attention kernels for the engines (docs/KERNELS.md).

- lean_attention: LeanAttention, stream-K decode attention over vLLM's paged KV cache
  (plan() once per batch on the host, run() to launch)
- split_kv: the split-KV (FlashDecoding-style) baseline
- reference: the PyTorch reference; checks: the input contract shared by all three
- bench: the GPU benchmark (make bench-kernels); accuracy: worst errors over random batches;
  aot: compile for NVIDIA GPUs on a machine without one
"""
