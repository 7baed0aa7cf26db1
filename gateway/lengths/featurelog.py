"""The feature log: one JSON line per finished request, its features and its real output.

`fairway train-router` learns from these files. The log rotates by size like logrotate's
`copytruncate`-free scheme: `features.jsonl` grows to `max_bytes`, then becomes
`features.jsonl.1` (older ones shift up, the oldest past `keep` is deleted) and a new file starts.
Writes are unbuffered appends of whole lines, so a crash loses at most the line being written
and a reader never sees half a record from a finished write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import orjson

NAME = "features.jsonl"


class FeatureLog:
    def __init__(self, directory: str | Path, max_bytes: int = 64 << 20, keep: int = 5) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / NAME
        self.max_bytes = max_bytes
        self.keep = keep
        self._f: IO[bytes] = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = self._f.tell()

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        if self._size and self._size + len(line) > self.max_bytes:
            self.rotate()
        self._f.write(line)
        self._size += len(line)

    def rotate(self) -> None:
        self._f.close()
        oldest = self.dir / f"{NAME}.{self.keep}"
        if oldest.exists():
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            src = self.dir / f"{NAME}.{i}"
            if src.exists():
                os.replace(src, self.dir / f"{NAME}.{i + 1}")
        if self.keep > 0:
            os.replace(self.path, self.dir / f"{NAME}.1")
        else:
            self.path.unlink()
        self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._f.close()


def log_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories to their feature logs, oldest first (`.5` ... `.1`, then current)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            rotated = sorted(p.glob(f"{NAME}.*"), key=lambda f: -int(f.suffix[1:] or 0))
            out.extend(f for f in rotated if f.suffix[1:].isdigit())
            if (p / NAME).exists():
                out.append(p / NAME)
        else:
            out.append(p)
    return out
