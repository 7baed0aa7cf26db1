"""The GPU benchmark's own code path, run end to end on tiny shapes (`--dry-run`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernels import bench  # noqa: E402


def test_dry_run_measures_every_contender(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--dry-run"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2 | 40 |")]
    assert rows, out
    cells = [c.strip() for c in rows[-1].strip("|").split("|")]
    lean, split_kv, sdpa = cells[3:6]
    for value in (lean, split_kv, sdpa):
        float(value)  # timed, so its output matched LeanAttention's
    assert "mismatch" not in out


def test_results_replace_only_the_marked_section(tmp_path: Path) -> None:
    doc = tmp_path / "KERNELS.md"
    doc.write_text(f"# Title\n\n{bench.BEGIN}\nold figures\n{bench.END}\n\nDesign stays.\n")
    bench.write_section(doc, "| new | table |")
    assert doc.read_text() == (
        f"# Title\n\n{bench.BEGIN}\n| new | table |\n{bench.END}\n\nDesign stays.\n"
    )
