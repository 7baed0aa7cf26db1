"""Continuous batching with chunked prefill and a paged KV-cache budget, as vLLM V1 does it.

Pure and synchronous: `schedule()` picks what the next step computes, `complete()` applies it.
The simulated engine server drives it with a wall clock; a discrete-event cluster simulator can
drive the very same object with a virtual one.

Token accounting follows vLLM: a sequence has `prompt + output` known tokens, of which
`computed` have their KV in the cache. A step computes `new` more; when every known token is
computed the step also samples one output token. Recompute preemption drops a sequence's KV
(computed = 0) and keeps its output, which is recomputed with the prompt when it is resumed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engines.perf_model import SeqWork


@dataclass(slots=True, eq=False)
class Sequence:
    rid: str
    prompt_tokens: int
    target_output: int  # the sequence stops after this many output tokens
    computed: int = 0
    output: int = 0
    blocks: int = 0
    preemptions: int = 0
    aborted: bool = False

    @property
    def pending(self) -> int:
        """Known tokens whose KV is not computed yet."""
        return self.prompt_tokens + self.output - self.computed

    @property
    def finished(self) -> bool:
        return self.output >= self.target_output


@dataclass(frozen=True, slots=True)
class StepPlan:
    items: tuple[tuple[Sequence, int], ...]

    def work(self) -> list[SeqWork]:
        return [SeqWork(s.computed, n) for s, n in self.items]

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass(slots=True)
class Scheduler:
    kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_batched_tokens: int = 2048
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    used_blocks: int = 0
    preemptions: int = 0

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.kv_blocks if self.kv_blocks else 0.0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is and free its KV blocks."""
        seq.aborted = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def schedule(self) -> StepPlan:
        budget = self.max_batched_tokens
        items: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            while not self._try_allocate(seq, n):
                victim = self.running.pop()  # lowest priority: the newest admitted
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                items.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            if not self._try_allocate(seq, n):
                break  # no skipping ahead: the head waits for memory
            self.waiting.popleft()
            self.running.append(seq)
            items.append((seq, n))
            budget -= n
        return StepPlan(tuple(items))

    def complete(self, plan: StepPlan) -> list[Sequence]:
        """Apply a finished step; returns the sequences that sampled a token in it."""
        sampled: list[Sequence] = []
        for seq, n in plan.items:
            if seq.aborted:
                continue  # aborted while the step ran
            seq.computed += n
            if seq.pending == 0:
                seq.output += 1
                sampled.append(seq)
                if seq.finished:
                    self.running.remove(seq)
                    self._free(seq)
        return sampled

    def _try_allocate(self, seq: Sequence, new_tokens: int) -> bool:
        need = -(-(seq.computed + new_tokens) // self.block_size) - seq.blocks
        if need <= 0:
            return True
        if self.used_blocks + need > self.kv_blocks:
            return False
        seq.blocks += need
        self.used_blocks += need
        return True

    def _free(self, seq: Sequence) -> None:
        self.used_blocks -= seq.blocks
        seq.blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)
