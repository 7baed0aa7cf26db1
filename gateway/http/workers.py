"""`fairway serve --workers N`: N gateway processes on one port, sharing state through Redis.

Each worker is a whole gateway (`fairway serve` on the same config) that binds the port with
SO_REUSEPORT, so the kernel spreads new connections over them; buckets, hard limits and the
fairness counters are shared through `[state] backend = "redis"`, the only backend that lets
N processes enforce one limit (hence `--workers > 1` is refused with the memory backend).
The supervisor forwards SIGTERM and SIGINT (each worker drains as `fairway serve` does) and
SIGHUP (each re-reads the config), restarts a worker that dies, and exits 0 once all have
stopped on a signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from gateway.config.schema import Config

RESTART_DELAY_S = 1.0  # before a worker that died is started again


def refusal(cfg: Config, workers: int, port: int) -> str | None:
    """Why `cfg` cannot run on `workers` processes, or None when it can."""
    if workers <= 1:
        return None
    if cfg.state.backend != "redis":
        return (
            f'--workers {workers} needs [state] backend = "redis": with the memory backend '
            f"each of the {workers} processes would enforce its own token buckets, limits and "
            "fairness, not one set shared by all. Set backend and redis_url, or run one worker."
        )
    sims = [e.id for e in cfg.engines if e.kind == "sim"]
    if sims:
        return (
            f"--workers {workers} cannot start in-process simulated engines ({', '.join(sims)}): "
            "each worker would start its own. Run them with `fairway sim` and list them as "
            'kind = "vllm" with their url, or run one worker.'
        )
    if port == 0:
        return f"--workers {workers} needs a fixed port (server.port or --port), not 0"
    return None


def supervise(argv: Sequence[str], workers: int) -> int:
    """Run `workers` copies of `fairway serve argv --reuse-port` until a signal stops them."""
    cmd = [sys.executable, "-m", "gateway.cli", "serve", *argv, "--reuse-port"]
    procs: list[subprocess.Popen[bytes]] = [subprocess.Popen(cmd) for _ in range(workers)]
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig != signal.SIGHUP:
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    print(f"fairway: {workers} workers, pids {' '.join(str(p.pid) for p in procs)}",
          file=sys.stderr)  # fmt: skip
    codes: dict[int, int] = {}  # exit codes of workers stopped by a signal
    while len(codes) < len(procs):
        for i, p in enumerate(procs):
            code = p.poll()
            if code is None or i in codes:
                continue
            if stopping:
                codes[i] = code
                continue
            print(f"fairway: worker {p.pid} exited with {code}; starting another",
                  file=sys.stderr)  # fmt: skip
            time.sleep(RESTART_DELAY_S)
            if stopping:
                codes[i] = 0  # died before the signal: nothing left to stop
            else:
                procs[i] = subprocess.Popen(cmd)
        time.sleep(0.1)
    return 0 if all(c == 0 for c in codes.values()) else 1
