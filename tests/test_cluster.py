"""The discrete-event cluster simulator against the performance model it drives."""

from __future__ import annotations

import pytest

from engines.cluster import ClusterSim, EngineSpec, Job, RouteOnArrival
from engines.cluster_parts import SimulatedEngine
from engines.perf_model import PerfModel, SeqWork


def _sim(n: int = 1) -> tuple[ClusterSim, RouteOnArrival]:
    turn = iter(range(10**9))

    def round_robin(job: Job, engines: list[SimulatedEngine]) -> str:
        return engines[next(turn) % len(engines)].id

    front = RouteOnArrival(round_robin)
    sim = ClusterSim([EngineSpec(f"e{i}", "r", "m") for i in range(n)], front)
    front.sim = sim
    return sim, front


def test_single_request_times_match_the_perf_model() -> None:
    sim, _ = _sim()
    job = Job("a", 1.0, "m", prompt_tokens=100, output_tokens=5)
    sim.run([job])
    perf = PerfModel.named("H100", "llama-3.1-8b")
    prefill = perf.step_time([SeqWork(0, 100)])
    decode = sum(perf.step_time([SeqWork(100 + i, 1)]) for i in range(4))
    assert job.first_token == pytest.approx(1.0 + prefill)
    assert job.finished == pytest.approx(1.0 + prefill + decode)
    assert job.generated == 5
    assert job.tpot == pytest.approx(decode / 4)


def test_every_job_finishes_and_load_spreads() -> None:
    sim, _ = _sim(4)
    jobs = [Job(str(i), i * 0.01, "m", 50 + i % 7 * 100, 1 + i % 50) for i in range(400)]
    sim.run(jobs)
    assert all(j.finished is not None and j.generated == j.output_tokens for j in jobs)
    assert {j.engine for j in jobs} == {"e0", "e1", "e2", "e3"}
    assert all(not e.jobs and not e.sched.has_work for e in sim.engines.values())
    # Batching: one request at a time needs a step per output token and is busy for the sum
    # of its requests' latencies; here each step carries several requests at once.
    for e in sim.engines.values():
        mine = [j for j in jobs if j.engine == e.id]
        assert e.steps < sum(j.output_tokens for j in mine) / 3, (e.id, e.steps)
        assert sum(j.latency or 0.0 for j in mine) > 3 * e.busy_s, e.id


def test_concurrent_requests_share_steps_continuous_batching() -> None:
    n, prompt, out = 16, 200, 50
    alone: list[tuple[float, int]] = []  # each request on an engine of its own
    for i in range(n):
        sim, _ = _sim()
        job = Job(str(i), 0.0, "m", prompt, out)
        sim.run([job])
        assert job.latency is not None
        alone.append((job.latency, sim.engines["e0"].steps))
    sim, _ = _sim()
    engine = sim.engines["e0"]
    sizes: list[int] = []  # sequences in each step, sampled as the step starts

    def sample() -> None:
        if engine.plan is not None and engine.steps > len(sizes):
            sizes.append(len(engine.plan.items))

    jobs = [Job(str(i), 0.0, "m", prompt, out) for i in range(n)]
    sim.run(jobs, on_event=sample)
    assert all(j.generated == out for j in jobs)
    makespan = max(j.finished or 0.0 for j in jobs)
    # Together they take about one request's time, not n times it (serially: ~6 s)...
    assert makespan < 2 * max(lat for lat, _ in alone), (makespan, alone[0])
    assert makespan < sum(lat for lat, _ in alone) / 4
    # ...because the steps are shared: a few more than one request's, not n times as many.
    assert len(sizes) == engine.steps
    assert engine.steps < sum(steps for _, steps in alone) / 4, engine.steps
    assert max(sizes) == n and sum(sizes) / len(sizes) > n / 2, sizes
    # Continuous: a request arriving mid-generation joins the running batch at once and
    # leaves when it is done, instead of waiting for the batch to drain.
    sim, _ = _sim()
    long, short = Job("long", 0.0, "m", prompt, 200), Job("short", 0.2, "m", prompt, 10)
    sim.run([long, short])
    assert long.first_token is not None and long.finished is not None
    assert short.ttft is not None and short.finished is not None
    assert long.first_token < short.arrival and short.ttft < 0.05 * long.finished
    assert short.finished < long.finished
    assert sim.engines["e0"].steps < 200 + 10


def test_overload_builds_a_queue_inside_the_engine() -> None:
    sim, _ = _sim()
    jobs = [Job(str(i), 0.0, "m", 4000, 400) for i in range(300)]
    sim.run(jobs)
    ttfts = sorted(j.ttft or 0.0 for j in jobs)
    assert ttfts[-1] > 20 * ttfts[0]


def test_unknown_engine_or_model_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        ClusterSim([EngineSpec("a", "r", "m"), EngineSpec("a", "r", "m")], RouteOnArrival(str))
