"""The simulated engine's clock: drives the scheduler with step times from the performance model.

One asyncio task per engine runs steps back to back while there is work. Each step sleeps for
its modelled duration times `time_scale`; sleeps are taken against a running deadline so that
timer granularity (uvloop rounds to a millisecond) does not slow a fast-scaled engine down.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from dataclasses import dataclass, field

from engines.perf_model import PerfModel
from engines.sim.scheduler import Scheduler, Sequence

# Output lengths when the request does not force one: a log-normal fitted to the generated
# tokens of the Azure LLM conversation trace (2023-11-16, 19,366 requests): mean of ln = 5.02,
# standard deviation 0.86, i.e. a median of 151 tokens.
OUTPUT_LOG_MEAN = 5.02
OUTPUT_LOG_SIGMA = 0.86


@dataclass(frozen=True, slots=True, kw_only=True)
class SimEngineConfig:
    model: str  # the name it serves under
    arch: str  # performance-model preset, see engines.perf_model.MODELS
    gpu: str = "H100"
    tp: int = 1
    time_scale: float = 1.0
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    block_size: int = 16
    seed: int | None = None
    engine_id: str = "0"
    api_key: str | None = None


@dataclass(slots=True, eq=False)
class Stream:
    """What a request handler waits on: tokens the engine has sampled for its sequence."""

    seq: Sequence
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False


class SimEngine:
    """A scheduler, a performance model and the task that steps them in (scaled) real time."""

    def __init__(self, cfg: SimEngineConfig) -> None:
        self.cfg = cfg
        self.perf = PerfModel.named(cfg.gpu, cfg.arch, cfg.tp)
        kv_tokens = self.perf.kv_capacity_tokens
        if kv_tokens < cfg.block_size:
            raise ValueError(
                f"{cfg.arch} does not fit on {cfg.tp} x {cfg.gpu}: no memory left for KV cache"
            )
        self.max_model_len = min(self.perf.model.max_model_len, kv_tokens)
        self.sched = Scheduler(
            kv_blocks=kv_tokens // cfg.block_size,
            block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs,
            max_batched_tokens=cfg.max_batched_tokens,
        )
        self.rng = random.Random(cfg.seed)
        self.streams: dict[str, Stream] = {}
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._deadline = 0.0

    def sample_output_len(self, seed: int | None) -> int:
        rng = random.Random(seed) if seed is not None else self.rng
        return max(1, round(math.exp(rng.gauss(OUTPUT_LOG_MEAN, OUTPUT_LOG_SIGMA))))

    def submit(self, rid: str, prompt_tokens: int, target_output: int) -> Stream:
        stream = Stream(Sequence(rid, prompt_tokens, target_output))
        self.streams[rid] = stream
        self.sched.add(stream.seq)
        self._work.set()
        return stream

    def abort(self, stream: Stream) -> None:
        if not stream.done:
            self.sched.abort(stream.seq)
            self._release(stream)

    def _release(self, stream: Stream) -> None:
        stream.done = True
        self.streams.pop(stream.seq.rid, None)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.sched.has_work:
                self._work.clear()
                await self._work.wait()
                self._deadline = loop.time()  # idle time is not owed to anyone
            plan = self.sched.schedule()
            if not plan:
                # Nothing fits; with nothing running this is a prompt larger than the whole
                # cache, which admission rejects, so wait for the next arrival or abort.
                self._work.clear()
                await self._work.wait()
                self._deadline = loop.time()
                continue
            # Sleep to a running deadline: a step that overslept a coarse timer is paid back
            # by the next ones, so the modelled rate holds at any time scale.
            self._deadline += self.perf.step_time(plan.work()) * self.cfg.time_scale
            await asyncio.sleep(max(0.0, self._deadline - loop.time()))
            for seq in self.sched.complete(plan):
                stream = self.streams.get(seq.rid)
                if stream is None:
                    continue
                if seq.finished:
                    self._release(stream)
                stream.wake.set()
