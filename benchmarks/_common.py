"""Helpers shared by the benchmark scripts: free ports, waiting for a server, the machine's
description, the Azure trace, percentiles, marked sections of the docs, gateway configs as TOML
text and matplotlib figures.

Standard library only (matplotlib is imported when a figure is drawn): the load generator
imports it in its own process, and every script can import it however it is run.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import math
import os
import platform
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The Azure LLM inference trace (conversation, 2023-11-16), next to the repository.
TRACE = Path(__file__).resolve().parents[2] / "shared/data/azure-llm-2023/conv.csv"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    url: str, proc: subprocess.Popen[bytes] | None = None, within: float = 120.0
) -> None:
    """Poll `url` until a GET of it succeeds; raise RuntimeError if `proc` (the server, when
    given) exits first or `within` seconds pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {within:.0f}s")


def machine() -> str:
    """One line for the reports: CPU model, cores and memory; OS and kernel; Python version."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def read_trace(path: Path = TRACE) -> Iterator[tuple[dt.datetime, int, int]]:
    """(arrival time, prompt tokens, output tokens) of each row of the trace, in file order."""
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            # The trace has seven fractional digits; fromisoformat takes six at most.
            ts = dt.datetime.fromisoformat(r["TIMESTAMP"][:26])
            yield ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])


def percentile(values: Iterable[float], q: float) -> float:
    """The `q`-th percentile (0 to 100) of `values`: the sorted value at rank q% of (n - 1),
    rounded to the nearest (numpy's "nearest"); NaN when there are none."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def quantile(values: Iterable[float], q: float) -> float:
    """The `q` quantile (0 to 1) of `values`: the sorted value at index floor(q * n), the last
    one at most; NaN when there are none. The routing figures are computed this way."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, int(q * len(s)))]


def _section_pattern(name: str) -> re.Pattern[str]:
    return re.compile(f"<!-- {re.escape(name)} -->.*<!-- /{re.escape(name)} -->", re.S)


def extract_section(text: str, name: str) -> str | None:
    """The section of a markdown doc between `<!-- name -->` and `<!-- /name -->`, markers
    included, or None when `text` has none."""
    m = _section_pattern(name).search(text)
    return m.group(0) if m else None


def splice_section(text: str, name: str, section: str) -> str:
    """`text` with its `name` section replaced by `section` (markers included), or with
    `section` appended when it has none, so that one script can own a part of a doc that
    another writes."""
    pattern = _section_pattern(name)
    if pattern.search(text):
        # A function as the replacement: `section` is inserted as is, backslashes included.
        return pattern.sub(lambda _: section, text)
    return text + "\n" + section + "\n"


def toml_value(v: Any) -> str:
    """`v` (bool, number, string, list or dict of those) as a TOML value; dicts inline. Strings
    are quoted, not escaped: the configs hold names, keys and URLs."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def toml_table(name: str, fields: Mapping[str, Any], *, array: bool = False) -> str:
    """A TOML table: its `[name]` header (`[[name]]` for an entry of an array of tables) and a
    `key = value` line per field; dotted keys such as `apps.chat` are written as given. No
    trailing newline."""
    header = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([header, *(f"{k} = {toml_value(v)}" for k, v in fields.items())])


def engine_table(region: str, model: str, **fields: Any) -> str:
    """The gateway config's table for one engine of `model` in `region` (kind, url, gpu...)."""
    return toml_table(f'engines.{region}."{model}"', fields, array=True)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use so
    that the scripts that do not plot start without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> None:
    """Lay out `fig`, write it to `path` as the docs' plots are (110 dpi), and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
