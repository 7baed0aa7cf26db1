"""Discrete-event cluster simulator: many engines, one virtual clock, hours of trace in seconds.

Each engine is the simulated engine's own `Scheduler` stepped by the same `PerfModel`, so a step
takes exactly the time the live simulated engine would sleep for it. Nothing here decides where
or when a request runs: a `Frontend` does. It is the gateway's pure policy code (admission, the
fairness queue, the router) adapted to the simulator's callbacks, so the simulator runs the very
objects the gateway runs. `engines` does not import `gateway`; the frontend brings the policies.

Events are arrivals, step ends, fleet changes and timers. After each event the frontend may start
requests; a request that is started goes straight into the engine's scheduler, as a proxied
request does.

The fleet changes while it serves: an engine asked for with `add_engine` joins only when its
start-up time has passed (and is paid from the moment it is asked for), `drain_engine` stops
new requests to one and lets it leave once idle. `gpu_hours` adds up GPUs x time from asked-for
to gone for every engine there ever was.

`coalesce=True` advances a run of pure decode steps (every running sequence decoding, nothing
that could be admitted) as one event: k steps, each timed by the performance model with its own
context length, up to the first step in which a sequence finishes. A request added to the engine
meanwhile cuts the run at the end of the step then in progress, so the engine's schedule is the
one stepping token by token would give; what differs is that the frontend hears of the run's
tokens once, at its end (`on_tokens(job, k)`), and KV blocks for the run are held from its start.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from engines.cluster_parts import EngineSpec, Frontend, Job, SimulatedEngine
from engines.perf_model import DecodeRun
from engines.sim.scheduler import Scheduler, Sequence, StepPlan

# EngineSpec and Job are named here as well: whoever builds a run builds them with the simulator.
__all__ = ["ClusterSim", "EngineSpec", "Job", "RouteOnArrival"]

# What an event is about: a step end (engine and epoch), an engine whose start-up is over, a
# timer, or the frontend's wake-up (None).
_STEP, _READY, _TIMER = 0, 1, 2
_Event = tuple[float, int, int, Any, int]


class ClusterSim:
    """Engines from `specs`, driven by `frontend`, fed by `jobs` (sorted by arrival).

    `engines` and `by_model` hold the engines present (serving or draining); `starting` those
    asked for and not yet serving; `retired` those gone."""

    def __init__(
        self, specs: Iterable[EngineSpec], frontend: Frontend, *, coalesce: bool = False
    ) -> None:
        self.engines: dict[str, SimulatedEngine] = {}
        self.by_model: dict[str, list[SimulatedEngine]] = {}
        self.starting: dict[str, SimulatedEngine] = {}
        self.retired: list[SimulatedEngine] = []
        self.coalesce = coalesce
        self.frontend = frontend
        self.now = 0.0
        self._events: list[_Event] = []
        self._wake_at: float | None = None
        self._tie = itertools.count()
        for spec in specs:
            self._check_new(spec.id)
            self._join(SimulatedEngine.build(spec))

    def engines_of(self, model: str) -> list[SimulatedEngine]:
        """The engines of `model` that take new requests."""
        return [e for e in self.by_model.get(model, ()) if not e.draining]

    # The fleet ---------------------------------------------------------------------------

    def add_engine(self, spec: EngineSpec, startup_s: float = 0.0) -> SimulatedEngine:
        """Ask for an engine now: paid from now, serving once `startup_s` has passed."""
        self._check_new(spec.id)
        if startup_s < 0:
            raise ValueError(f"startup_s must be >= 0, got {startup_s}")
        engine = SimulatedEngine.build(spec)
        engine.asked_at = self.now
        engine.ready_at = self.now + startup_s
        self.starting[spec.id] = engine
        self._push(engine.ready_at, _READY, engine)
        return engine

    def drain_engine(self, engine_id: str) -> None:
        """No new requests to the engine; it leaves once its requests are done (at once when
        idle; an engine still starting is cancelled, paid until now)."""
        starting = self.starting.pop(engine_id, None)
        if starting is not None:
            starting.gone_at = starting.ready_at = self.now
            self.retired.append(starting)
            return
        engine = self.engines.get(engine_id)
        if engine is None:
            raise KeyError(f"no engine {engine_id!r}")
        if engine.draining:
            return
        engine.draining = True
        hook = getattr(self.frontend, "on_engine_drain", None)
        if hook is not None:
            hook(engine, self.now)
        self._leave_if_idle(engine)

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        """Run `fn(now)` at virtual time `when` (a controller's timer)."""
        self._push(max(when, self.now), _TIMER, fn)

    def gpu_hours(self, until: float | None = None) -> float:
        """GPU-hours of every engine there ever was, from asked-for to gone (or `until`)."""
        now = self.now if until is None else until
        return sum(e.gpu_seconds(now) for e in self.all_engines()) / 3600

    def all_engines(self) -> list[SimulatedEngine]:
        return [*self.retired, *self.engines.values(), *self.starting.values()]

    def _check_new(self, engine_id: str) -> None:
        if (
            engine_id in self.engines
            or engine_id in self.starting
            or any(e.id == engine_id for e in self.retired)
        ):
            raise ValueError(f"duplicate engine id {engine_id!r}")

    def _join(self, engine: SimulatedEngine) -> None:
        self.engines[engine.id] = engine
        self.by_model.setdefault(engine.spec.model, []).append(engine)

    def _ready(self, engine: SimulatedEngine) -> None:
        if self.starting.pop(engine.id, None) is None:
            return  # cancelled while starting
        self._join(engine)
        hook = getattr(self.frontend, "on_engine_ready", None)
        if hook is not None:
            hook(engine, self.now)

    def _leave_if_idle(self, engine: SimulatedEngine) -> None:
        if not engine.draining or engine.jobs or engine.plan is not None:
            return
        engine.gone_at = self.now
        del self.engines[engine.id]
        self.by_model[engine.spec.model].remove(engine)
        self.retired.append(engine)
        hook = getattr(self.frontend, "on_engine_gone", None)
        if hook is not None:
            hook(engine, self.now)

    # The clock ---------------------------------------------------------------------------

    def _push(self, when: float, kind: int, what: Any, epoch: int = 0) -> None:
        heapq.heappush(self._events, (when, next(self._tie), kind, what, epoch))

    def run(
        self,
        jobs: Iterable[Job],
        until: float | None = None,
        on_event: Callable[[], None] = lambda: None,
    ) -> list[Job]:
        """Simulate until every job has finished and no event is left (or `until`); returns
        the jobs in arrival order. `on_event` runs after each event, e.g. to sample per-tenant
        service."""
        done: list[Job] = []
        arrivals: Iterator[Job] = iter(jobs)
        nxt = next(arrivals, None)
        while nxt is not None or self._events:
            t_event = self._events[0][0] if self._events else math.inf
            if nxt is not None and nxt.arrival <= t_event:
                self.now = nxt.arrival
                if until is not None and self.now > until:
                    break
                done.append(nxt)
                self.frontend.on_arrival(nxt, self.now)
                nxt = next(arrivals, None)
            else:
                when, _, kind, what, epoch = self._events[0]
                if until is not None and when > until:
                    break
                heapq.heappop(self._events)
                if kind == _STEP and what.epoch != epoch:
                    continue  # a run cut short: its new end is queued
                self.now = when
                if kind == _STEP:
                    self._step_done(what)
                elif kind == _READY:
                    self._ready(what)
                elif kind == _TIMER:
                    what(self.now)
                else:
                    self._wake_at = None
            self._dispatch()
            self._arm_wake()
            on_event()
        return done

    def _dispatch(self) -> None:
        for job, engine_id in self.frontend.ready(self.now):
            engine = self.engines.get(engine_id)
            if engine is None or engine.draining:
                raise ValueError(f"{job.id}: engine {engine_id} is not serving")
            if engine.spec.model != job.model:
                raise ValueError(f"{job.id}: engine {engine_id} does not serve {job.model}")
            job.engine, job.started = engine_id, self.now
            seq = Sequence(job.id, job.prompt_tokens, max(1, job.output_tokens))
            engine.jobs[job.id] = job
            engine.seqs[job.id] = seq
            engine.sched.add(seq)
            if engine.plan is None:
                self._start_step(engine)
            elif engine.run is not None:
                self._cut_run(engine)

    def _arm_wake(self) -> None:
        """A frontend with rate limits may name a time to be asked again (`wake_at`)."""
        wake_at = getattr(self.frontend, "wake_at", None)
        when = wake_at(self.now) if wake_at is not None else None
        if when is not None and when > self.now and when != self._wake_at:
            self._wake_at = when
            self._push(when, -1, None)

    # Engine steps ------------------------------------------------------------------------

    def _start_step(self, engine: SimulatedEngine) -> None:
        plan = engine.sched.schedule()
        if not plan:
            engine.plan = None  # idle, or the head needs more KV than exists: wait
            self._leave_if_idle(engine)
            return
        engine.plan = plan
        if self.coalesce and self._start_run(engine, plan):
            return
        dt = engine.perf.step_time(plan.work())
        engine.busy_s += dt
        engine.steps += 1
        self._push(self.now + dt, _STEP, engine, engine.epoch)

    def _start_run(self, engine: SimulatedEngine, plan: StepPlan) -> bool:
        """Start `plan` as the first of k > 1 decode steps when nothing can change the
        schedule before the first sequence finishes; False when it cannot be coalesced."""
        sched = engine.sched
        items = plan.items
        if len(items) != len(sched.running):
            return False
        k = math.inf
        cached = 0
        for seq, n in items:
            if n != 1 or seq.pending != 1 or seq.output < 1:
                return False
            k = min(k, seq.target_output - seq.output)
            cached += seq.computed
        if k < 2 or (sched.waiting and not self._head_blocked(sched, len(items))):
            return False
        steps = int(k)
        # KV for the whole run, held from its start; a shorter run when it does not fit.
        bs = sched.block_size
        while steps > 1:
            need = sum(-(-(s.computed + steps) // bs) - s.blocks for s, _ in items)
            if sched.used_blocks + need <= sched.kv_blocks:
                break
            steps //= 2
        if steps < 2:
            return False
        for seq, _ in items:
            grow = -(-(seq.computed + steps) // bs) - seq.blocks
            if grow > 0:
                seq.blocks += grow
                sched.used_blocks += grow
        run = DecodeRun.plan(engine.perf, self.now, steps, len(items), cached)
        end = run.end()
        engine.run = run
        engine.busy_s += end - self.now
        engine.steps += steps
        self._push(end, _STEP, engine, engine.epoch)
        return True

    @staticmethod
    def _head_blocked(sched: Scheduler, running: int) -> bool:
        """True when `schedule()` would admit no waiting sequence during a decode run: the
        batch is full, the token budget spent, or the head's first chunk finds no KV (which
        only fills up while the run decodes)."""
        if running >= sched.max_num_seqs or sched.max_batched_tokens - running <= 0:
            return True
        head = sched.waiting[0]
        n = min(head.pending, sched.max_batched_tokens - running)
        need = -(-(head.computed + n) // sched.block_size) - head.blocks
        return sched.used_blocks + need > sched.kv_blocks

    def _cut_run(self, engine: SimulatedEngine) -> None:
        """A request joined during a coalesced run: the run ends with the step in progress."""
        run = engine.run
        assert run is not None
        assert engine.plan is not None
        done = run.steps_by(self.now)
        if done == run.steps:
            return
        end = run.end()
        engine.steps -= run.steps - done
        run.steps = done
        engine.busy_s -= end - run.end()
        bs = engine.sched.block_size
        for seq, _ in engine.plan.items:
            keep = -(-(seq.computed + done) // bs)
            if seq.blocks > keep:
                engine.sched.used_blocks -= seq.blocks - keep
                seq.blocks = keep
        engine.epoch += 1
        self._push(run.end(), _STEP, engine, engine.epoch)

    def _step_done(self, engine: SimulatedEngine) -> None:
        assert engine.plan is not None
        if engine.run is not None:
            self._run_done(engine, engine.run.steps)
        else:
            for seq in engine.sched.complete(engine.plan):
                self._sampled(engine, seq, 1)
        engine.plan = None
        self._start_step(engine)

    def _run_done(self, engine: SimulatedEngine, k: int) -> None:
        assert engine.plan is not None
        engine.run = None
        sched = engine.sched
        for seq, _ in engine.plan.items:
            seq.computed += k
            seq.output += k
            if seq.finished:
                sched.running.remove(seq)
                sched.used_blocks -= seq.blocks
                seq.blocks = 0
            self._sampled(engine, seq, k)

    def _sampled(self, engine: SimulatedEngine, seq: Sequence, n: int) -> None:
        job = engine.jobs[seq.rid]
        job.generated += n
        if job.first_token is None:
            job.first_token = self.now
        self.frontend.on_tokens(job, n, self.now)
        if seq.finished:
            job.finished = self.now
            del engine.jobs[seq.rid], engine.seqs[seq.rid]
            self.frontend.on_finish(job, self.now)


class RouteOnArrival:
    """The simplest frontend: no admission, no queue; each request is routed as it arrives.
    `choose(job, engines)` picks one of the model's simulated engines by id."""

    def __init__(self, choose: Callable[[Job, list[SimulatedEngine]], str]) -> None:
        self.choose = choose
        self.sim: ClusterSim | None = None
        self._ready: list[tuple[Job, str]] = []

    def on_arrival(self, job: Job, now: float) -> None:
        assert self.sim is not None, "attach the simulator: frontend.sim = sim"
        self._ready.append((job, self.choose(job, self.sim.engines_of(job.model))))

    def ready(self, now: float) -> Iterable[tuple[Job, str]]:
        out, self._ready = self._ready, []
        return out

    def on_tokens(self, job: Job, n: int, now: float) -> None:
        pass

    def on_finish(self, job: Job, now: float) -> None:
        pass
