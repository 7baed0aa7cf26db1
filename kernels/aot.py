"""Compile the kernels ahead of time for NVIDIA GPUs, on a machine without one.

    python -m kernels.aot            # sm_80 and sm_90, fp16 and bf16, head dims 64 and 128

Triton lowers each kernel to PTX and assembles it with the ptxas it ships, so this proves the
kernels are legal GPU code (tl.dot shapes, loop-carried types), and shows what the interpreter
cannot: shared memory, whether the K/V loads are software-pipelined (asynchronous copies), and
that the merge counter is an acq_rel atomic at GPU scope. The arguments are specialised as the
JIT specialises them at a launch on vLLM's GPU cache: unit head-dim strides become constants,
pointers and other strides are known multiples of 16. It needs the real JIT: run it without
TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import inspect
import os
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.lean_attention import LAUNCH_OPTIONS, _lean_decode_kernel, default_block_n
from kernels.split_kv import _merge_splits_kernel, _split_kv_kernel

TRITON_DTYPES = {"fp16": "fp16", "bf16": "bf16"}
F32_POINTERS = {"part_acc_ptr", "part_m_ptr", "part_l_ptr"}
I32_POINTERS = {
    "bt_ptr", "lens_ptr", "pair_tile_start_ptr", "prog_tile_start_ptr", "prog_pair_ptr",
    "pair_first_prog_ptr", "pair_nseg_ptr", "counter_ptr",
}  # fmt: skip


@dataclass(frozen=True)
class Compiled:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    shared_bytes: int
    async_copies: int  # asynchronous global-to-shared copies in the pipelined loop
    acq_rel_atomics: int
    ptx: str


def signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types for a kernel's parameters: pointers by name, `qk_scale` fp32, the rest
    i32 (strides and counts)."""
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in F32_POINTERS:
            sig[name] = "*fp32"
        elif name in I32_POINTERS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + TRITON_DTYPES[dtype]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(fn: Any, arch: int, dtype: str, constexprs: dict[str, Any]) -> Any:
    names = list(inspect.signature(fn.fn).parameters)
    sig = signature(fn, dtype, constexprs)
    aligned = [["tt.divisibility", 16]]
    attrs = {
        (i,): aligned
        for i, n in enumerate(names)
        if n not in constexprs and (sig[n].startswith("*") or n.startswith("stride"))
    }
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs=attrs,
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=LAUNCH_OPTIONS)


def compile_all(arch: int, dtype: str, head_dim: int) -> list[Compiled]:
    """The LeanAttention kernel, the split-KV kernel and its merge, as launched on a GPU for a
    GQA group of 4 with 16-token pages."""
    tile = {"PAGE": 16, "BLOCK_G": 16, "HEAD_DIM": head_dim, "stride_kd": 1, "stride_vd": 1}
    attend = tile | {"BLOCK_N": default_block_n(head_dim), "PRECISION": "tf32"}
    merge = {"BLOCK_G": 16, "HEAD_DIM": head_dim}
    out = []
    for fn, constexprs in (
        (_lean_decode_kernel, attend),
        (_split_kv_kernel, attend),
        (_merge_splits_kernel, merge),
    ):
        k = compile_kernel(fn, arch, dtype, constexprs)
        name = fn.fn.__name__.strip("_")
        ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
        copies = ttgir.count("async_copy_global_to_local")
        atomics = ptx.count("atom.global.gpu.acq_rel")
        out.append(Compiled(name, arch, dtype, head_dim, k.metadata.shared, copies, atomics, ptx))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16"], choices=TRITON_DTYPES)
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT")
    head = ["kernel", "sm", "dtype", "head dim", "shared bytes", "async copies", "acq_rel atomics"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arch in a.arch:
        for dtype in a.dtype:
            for head_dim in a.head_dim:
                for c in compile_all(arch, dtype, head_dim):
                    cells = (c.kernel, c.arch, c.dtype, c.head_dim, c.shared_bytes,
                             c.async_copies, c.acq_rel_atomics)  # fmt: skip
                    print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
