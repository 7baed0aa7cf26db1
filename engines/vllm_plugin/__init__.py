"""LeanAttention as a vLLM attention backend, registered through `vllm.general_plugins`.

- GPUs: the backend fills vLLM's `CUSTOM` slot; choose it with `--attention-backend CUSTOM`.
  Decode batches go through the LeanAttention kernel, everything else through vLLM's Triton
  backend, which it extends.
- CPUs: vLLM ignores `CUSTOM` there, so with FAIRWAY_LEAN_ATTENTION=1 the backend takes the
  `CPU_ATTN` slot instead (the kernel then runs under TRITON_INTERPRET=1); prefill stays on
  vLLM's CPU kernel.

FAIRWAY_LEAN_CALLS_FILE names a file to which every decode launch appends one line, so a test
can prove that decode went through the kernel.
"""

from __future__ import annotations

import os

TAKE_CPU_SLOT_ENV = "FAIRWAY_LEAN_ATTENTION"


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM calls it in every process it starts."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(
        AttentionBackendEnum.CUSTOM, "engines.vllm_plugin.gpu_backend.LeanAttentionBackend"
    )
    if os.environ.get(TAKE_CPU_SLOT_ENV) == "1":
        register_backend(
            AttentionBackendEnum.CPU_ATTN,
            "engines.vllm_plugin.cpu_backend.LeanCPUAttentionBackend",
        )
