"""The discrete-event cluster simulator against the performance model it drives."""

from __future__ import annotations

import pytest

from engines.cluster import ClusterSim, EngineSpec, Job, RouteOnArrival, SimulatedEngine
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
    # Batching: 400 requests finish far sooner than run one at a time.
    assert max(j.finished for j in jobs if j.finished) < sum(e.busy_s for e in sim.engines.values())


def test_overload_builds_a_queue_inside_the_engine() -> None:
    sim, _ = _sim()
    jobs = [Job(str(i), 0.0, "m", 4000, 400) for i in range(300)]
    sim.run(jobs)
    ttfts = sorted(j.ttft or 0.0 for j in jobs)
    assert ttfts[-1] > 20 * ttfts[0]


def test_unknown_engine_or_model_is_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        ClusterSim([EngineSpec("a", "r", "m"), EngineSpec("a", "r", "m")], RouteOnArrival(str))
