"""The tree as DESIGN.md lays it out: no module imports itself back, contracts hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "engines", "kernels", "planner", "loadtest")


def _cycle(graph: grimp.ImportGraph, packages: tuple[str, ...] = PACKAGES) -> list[str] | None:
    """One import cycle among the project's modules, if there is any."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n.split(".")[0] not in packages:
                continue
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph.modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles() -> None:
    graph = grimp.build_graph(*PACKAGES)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one(tmp_path: Path) -> None:
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc import b\n")
    (pkg / "b.py").write_text("from cyc import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        graph = grimp.build_graph("cyc")
    finally:
        sys.path.remove(str(tmp_path))
    assert _cycle(graph, ("cyc",)) in (["cyc.a", "cyc.b", "cyc.a"], ["cyc.b", "cyc.a", "cyc.b"])


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None
    run = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
