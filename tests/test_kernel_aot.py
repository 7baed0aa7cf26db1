"""The kernels compile for an H100 (sm_90) without one: legal GPU code, K/V loads pipelined
through asynchronous copies, and the stream-K merge counter an acq_rel atomic at GPU scope."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Only looked up, not imported: Triton must be imported after TRITON_INTERPRET is settled, which
# the interpreter tests do in this same process.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs torch and triton",
)

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_compile_for_sm90_with_pipelined_loads_and_acq_rel_merge() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    args = ["--arch", "90", "--dtype", "bf16", "--head-dim", "128"]
    done = subprocess.run(
        [sys.executable, "-m", "kernels.aot", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "90":
            rows[cells[0]] = [int(c) for c in cells[4:]]
    shared, copies, atomics = rows["lean_decode_kernel"]
    assert copies > 0 and atomics == 2 and 0 < shared <= 100 * 1024, rows
    shared, copies, atomics = rows["split_kv_kernel"]
    assert copies > 0 and atomics == 0, rows
    assert "merge_splits_kernel" in rows
