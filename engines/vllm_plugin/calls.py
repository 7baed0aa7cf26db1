"""Evidence that decode went through LeanAttention: one appended line per kernel launch."""

from __future__ import annotations

import logging
import os

CALLS_FILE_ENV = "FAIRWAY_LEAN_CALLS_FILE"

log = logging.getLogger("fairway.lean_attention")


class LaunchLog:
    """One per attention layer. Appends `lean_attention layer=... seqs=... programs=...` to
    the file named by FAIRWAY_LEAN_CALLS_FILE (O_APPEND keeps lines whole across processes),
    and logs the layer's first launch."""

    def __init__(self) -> None:
        self.path = os.environ.get(CALLS_FILE_ENV)
        self.launches = 0

    def record(self, layer: str, seqs: int, programs: int) -> None:
        if self.launches == 0:
            log.warning("LeanAttention decode kernel in use (first launch: %s)", layer)
        self.launches += 1
        if self.path:
            line = f"lean_attention layer={layer} seqs={seqs} programs={programs}\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
