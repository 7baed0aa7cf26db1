"""Actuators: what turns the planner's decisions into engines that start and drain.

All four implement `planner.controller.Actuator`:
- `sim`: simulated engines added to and drained from the gateway's own fleet;
- `process`: engine processes on this machine from a command template (`fairway sim ...`, a
  vLLM server), registered in the fleet once healthy and stopped once drained;
- `dry-run`: logs what it would do and changes nothing;
- `kubernetes` (planner.kubernetes): one Deployment per (model, region, GPU type), scaled
  through its `scale` subresource.

The planner imports nothing of the gateway: the fleet reaches the first two through the small
`FleetPort` protocol, which the gateway implements over its fleet manager
(gateway.fleet.planning). An engine that fails to start is reported to the controller, which
re-plans without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shlex
import socket
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog

from planner.controller import Decision, EngineRecord
from planner.problem import Key

log = structlog.get_logger("fairway.planner")


@dataclass(frozen=True, slots=True)
class EngineShape:
    """How an engine of one (model, GPU type) is started: perf-model preset, GPUs, batch."""

    arch: str
    tp: int = 1
    max_num_seqs: int = 256


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """An engine to join the fleet: `url` "" asks the gateway to start a simulated one."""

    id: str
    model: str
    region: str
    gpu: str
    shape: EngineShape
    url: str = ""


@dataclass(frozen=True, slots=True)
class FleetEngine:
    id: str
    model: str
    region: str
    gpu: str
    added_at: float  # on the fleet's clock
    draining: bool


class FleetPort(Protocol):
    """The gateway's fleet as the planner sees it."""

    def clock(self) -> float: ...

    def engines(self) -> list[FleetEngine]: ...

    async def add(self, spec: EngineSpec) -> None:
        """Admit the engine (start it first when simulated); raises OSError or ValueError."""
        ...

    async def remove(self, engine_id: str, deadline_s: float) -> None:
        """Drain the engine and return once it has left (when idle or at the deadline)."""
        ...


class Base:
    """Failure callbacks and background tasks, kept until done and cancelled on close."""

    kind = "base"

    def __init__(self, keys: Iterable[Key], clock: Callable[[], float]) -> None:
        self.keys = frozenset(keys)
        self.clock = clock
        self._callbacks: list[Callable[[EngineRecord], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def on_failure(self, callback: Callable[[EngineRecord], None]) -> None:
        self._callbacks.append(callback)

    def _fail(self, e: EngineRecord, detail: str) -> None:
        failed = EngineRecord(e.id, e.model, e.region, e.gpu, self.clock(), "failed", detail)
        for cb in self._callbacks:
            cb(failed)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _FleetActuator(Base):
    """Engines of the gateway's fleet: those of the planner's (model, region, GPU type)s,
    wherever they came from (the config, the admin API, this actuator), plus its own still
    starting."""

    def __init__(
        self, port: FleetPort, shapes: Mapping[tuple[str, str], EngineShape], keys: Iterable[Key]
    ) -> None:
        super().__init__(keys, port.clock)
        self.port = port
        self.shapes = shapes
        self.starting: dict[str, EngineRecord] = {}
        self._ids = itertools.count(1)

    async def engines(self) -> list[EngineRecord]:
        out = [
            EngineRecord(e.id, *key, e.added_at, "draining" if e.draining else "serving")
            for e in self.port.engines()
            if (key := (e.model, e.region, e.gpu)) in self.keys and e.id not in self.starting
        ]
        return out + list(self.starting.values())

    def _new_id(self, model: str, region: str) -> str:
        taken = {e.id for e in self.port.engines()} | set(self.starting)
        while True:
            eid = f"{region}/{model}/plan-{next(self._ids)}"
            if eid not in taken:
                return eid

    async def apply(self, decision: Decision) -> None:
        for s in decision.starts:
            for _ in range(s.count):
                eid = self._new_id(s.model, s.region)
                rec = EngineRecord(eid, s.model, s.region, s.gpu, self.clock(), "starting")
                self.starting[eid] = rec
                self._spawn(self._start(rec))
        for d in decision.drains:
            self._spawn(self._drain(d.engine_id, d.deadline_s))

    async def _start(self, rec: EngineRecord) -> None:
        raise NotImplementedError

    async def _drain(self, engine_id: str, deadline_s: float) -> None:
        with contextlib.suppress(KeyError):  # left meanwhile
            await self.port.remove(engine_id, deadline_s)


class SimActuator(_FleetActuator):
    """Simulated engines in the gateway's own event loop; `startup_s` stands in for the
    time a real engine takes to come up (it counts as starting meanwhile)."""

    kind = "sim"

    def __init__(
        self,
        port: FleetPort,
        shapes: Mapping[tuple[str, str], EngineShape],
        keys: Iterable[Key],
        startup_s: float = 0.0,
    ) -> None:
        super().__init__(port, shapes, keys)
        self.startup_s = startup_s

    async def _start(self, rec: EngineRecord) -> None:
        try:
            if self.startup_s:
                await asyncio.sleep(self.startup_s)
            spec = EngineSpec(rec.id, rec.model, rec.region, rec.gpu,
                              self.shapes[rec.model, rec.gpu])  # fmt: skip
            await self.port.add(spec)
        except (OSError, ValueError) as exc:
            self._fail(rec, str(exc))
        finally:
            self.starting.pop(rec.id, None)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ProcessActuator(_FleetActuator):
    """Engine processes on this machine. Each gets a free port, must answer `health_path`
    within `start_timeout_s`, then joins the fleet; after its drain it gets SIGTERM (SIGKILL
    after `stop_timeout_s`). One that exits, or never becomes healthy, is reported failed."""

    kind = "process"

    def __init__(
        self,
        port: FleetPort,
        shapes: Mapping[tuple[str, str], EngineShape],
        keys: Iterable[Key],
        command: str,
        host: str = "127.0.0.1",
        health_path: str = "/health",
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(port, shapes, keys)
        self.command = command
        self.host = host
        self.health_path = health_path
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._stopping: set[str] = set()

    def argv(self, rec: EngineRecord, port: int) -> list[str]:
        return shlex.split(self.command.format(id=rec.id, port=port, model=rec.model,
                                               region=rec.region, gpu=rec.gpu))  # fmt: skip

    async def _start(self, rec: EngineRecord) -> None:
        port = free_port(self.host)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(rec, port), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except (OSError, ValueError) as exc:
            self.starting.pop(rec.id, None)
            self._fail(rec, f"cannot run {self.command!r}: {exc}")
            return
        self.procs[rec.id] = proc
        tail = bytearray()
        self._spawn(_keep_tail(proc, tail))
        url = f"http://{self.host}:{port}"
        try:
            why = await self._healthy(proc, url, tail)
            if why is None:
                spec = EngineSpec(rec.id, rec.model, rec.region, rec.gpu,
                                  self.shapes[rec.model, rec.gpu], url)  # fmt: skip
                try:
                    await self.port.add(spec)
                except (OSError, ValueError) as exc:
                    why = f"could not join the fleet: {exc}"
        finally:
            self.starting.pop(rec.id, None)
        if why is not None:
            await self._stop(rec.id)
            self._fail(rec, why)
            return
        log.info("planner_process_started", engine=rec.id, url=url, pid=proc.pid)
        self._spawn(self._watch(rec, proc, tail))

    async def _healthy(
        self, proc: asyncio.subprocess.Process, url: str, tail: bytearray
    ) -> str | None:
        """None once `url` answers its health path; else why it never did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while loop.time() < deadline:
                if proc.returncode is not None:
                    return _exited(proc, tail)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url + self.health_path) as resp:
                        if resp.status == 200:
                            return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.1)
        return f"not healthy at {url}{self.health_path} within {self.start_timeout_s:g} s"

    async def _watch(
        self, rec: EngineRecord, proc: asyncio.subprocess.Process, tail: bytearray
    ) -> None:
        await proc.wait()
        if rec.id in self._stopping:
            return
        self.procs.pop(rec.id, None)
        with contextlib.suppress(KeyError):
            await self.port.remove(rec.id, 0.0)
        self._fail(rec, _exited(proc, tail))

    async def _drain(self, engine_id: str, deadline_s: float) -> None:
        self._stopping.add(engine_id)
        try:
            await super()._drain(engine_id, deadline_s)
        finally:
            await self._stop(engine_id)

    async def _stop(self, engine_id: str) -> None:
        self._stopping.add(engine_id)
        proc = self.procs.pop(engine_id, None)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        log.info("planner_process_stopped", engine=engine_id, returncode=proc.returncode)

    async def close(self) -> None:
        await super().close()
        for eid in list(self.procs):
            await self._stop(eid)


async def _keep_tail(proc: asyncio.subprocess.Process, tail: bytearray) -> None:
    assert proc.stderr is not None
    while chunk := await proc.stderr.read(4096):
        tail += chunk
        del tail[:-2000]


def _exited(proc: asyncio.subprocess.Process, tail: bytearray) -> str:
    last = tail.decode(errors="replace").strip().splitlines()[-3:]
    said = f": {' | '.join(last)}" if last else ""
    return f"exited with status {proc.returncode} before it was drained{said}"


class DryRunActuator(Base):
    """Logs each decision; the engines it reports are what `list_engines` gives."""

    kind = "dry-run"

    def __init__(
        self,
        keys: Iterable[Key],
        clock: Callable[[], float],
        list_engines: Callable[[], list[EngineRecord]] = list,
    ) -> None:
        super().__init__(keys, clock)
        self.list_engines = list_engines
        self.decisions: list[Decision] = []

    async def engines(self) -> list[EngineRecord]:
        return [e for e in self.list_engines() if e.key in self.keys]

    async def apply(self, decision: Decision) -> None:
        self.decisions = [*self.decisions[-99:], decision]
        log.info("planner_dry_run", status=decision.status,
                 wanted={"/".join(k): n for k, n in decision.wanted.items()},
                 start=[f"{s.count} x {'/'.join(s.key)}" for s in decision.starts],
                 drain=[d.engine_id for d in decision.drains])  # fmt: skip
