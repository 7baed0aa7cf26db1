"""One fairness across gateway replicas: service counters, waiting tenants and engine load
shared through Redis.

Each replica keeps its own fairness queues (a request waits at the replica it came to), but
every `state.sync_interval_s` it runs one Lua script per model that

- adds what its VTC/WSC counters grew by since the last sync to the model's shared counters
  (a counter lifted or rebased as a maximum or minimum) and reads them all back, so every
  replica orders tenants by the service they received from all replicas together;
- publishes which tenants wait here and what this replica has in flight at each engine, and
  reads what the others published.

Each replica may fill its share of an engine's in-flight limit (the limit split evenly over
the replicas seen, the remainder by rank) whatever the others report, and beyond it only what
the others leave free, counting a replica with requests waiting at no less than its share: so
replicas that decide at once on the same stale view never fill an engine more than once over.

The policy then holds back a tenant that is ahead of a tenant waiting at another replica
(`Vtc.may_start`), so freed engine capacity goes where the less served tenant waits; and the
dispatcher counts the other replicas' in-flight requests against each engine's limits
(`EngineLoad.others`), so N replicas do not fill an engine N times over.

Counter growth is sent once: a sync carries an id, and a sync that timed out here is resent
with that id, which Redis applies at most once. A replica that stops syncing drops out of the
others' view after `stale_s`. While Redis does not answer for that long, this replica decides
alone (its own counters, its own load), and sends what it owes once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
import structlog

from gateway.core.fair_queue import FairnessPolicy
from gateway.core.fairness import Vtc
from gateway.core.ledger import EngineLoad
from gateway.state.demand import SharedDemand

# KEYS: the model's counters (hash tenant -> counter), its presence (hash replica -> "time
# json"), the sync's id key. ARGV: replica, stale seconds, this replica's presence json, the
# sync's id ('' when it carries no counters), then (tenant, increment, mark) triples: a mark
# ("max V" or "min V", or '') sets the counter to at least or at most V before the increment.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[4] ~= '' and redis.call('SET', KEYS[3], '1', 'NX', 'EX', 3600) then
  for i = 5, #ARGV, 3 do
    local mark = ARGV[i + 2]
    if mark ~= '' then
      local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
      local op, to = string.sub(mark, 1, 3), tonumber(string.sub(mark, 5))
      if (op == 'max' and cur < to) or (op == 'min' and cur > to) then
        redis.call('HSET', KEYS[1], ARGV[i], string.sub(mark, 5))
      end
    end
    redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], 86400)
redis.call('HSET', KEYS[2], ARGV[1], string.format('%.6f ', now) .. ARGV[3])
redis.call('EXPIRE', KEYS[2], 3600)
local others = {}
local seen = redis.call('HGETALL', KEYS[2])
for i = 1, #seen, 2 do
  local v = seen[i + 1]
  local sp = string.find(v, ' ', 1, true)
  if now - tonumber(string.sub(v, 1, sp - 1)) > tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[2], seen[i])
  elseif seen[i] ~= ARGV[1] then
    others[#others + 1] = seen[i]
    others[#others + 1] = string.sub(v, sp + 1)
  end
end
return {redis.call('HGETALL', KEYS[1]), others}
"""

# tenant, increment, and the counter set outright first: ("max" or "min", value), or None
Triple = tuple[str, float, tuple[str, float] | None]


@dataclass(slots=True)
class _Model:
    """What this replica has told Redis of one model's counters."""

    base: dict[str, float] = field(default_factory=dict)  # of our counters, what Redis has
    pending: tuple[str, list[Triple]] | None = None  # a sync Redis may not have applied yet


class ClusterSync:
    """Shares fairness counters, waiting tenants and in-flight load with the other replicas;
    `run()` is the replica's background task."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        models: Callable[[], Iterable[str]],
        policy: Callable[[str], FairnessPolicy],
        loads: Callable[[], dict[str, EngineLoad]],
        engines_of: Callable[[str], Iterable[str]],
        poll: Callable[[str], None],
        interval_s: float = 0.1,
        timeout_s: float = 0.25,
        on_replicas: Callable[[int], None] | None = None,
        demand_flush_s: float = 1.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self.redis = aioredis.from_url(url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)  # fmt: skip
        self._sync = self.redis.register_script(_SYNC)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.prefix = prefix
        self.models, self.policy, self.loads = models, policy, loads
        self.engines_of, self.poll = engines_of, poll
        self.interval_s, self.timeout_s = interval_s, timeout_s
        # Another replica that has not synced for this long has stopped (or lost Redis).
        self.stale_s = max(1.0, 10 * interval_s)
        self.on_replicas = on_replicas
        self.replica = f"{os.uname().nodename}:{os.getpid()}:{os.urandom(4).hex()}"
        self.state: dict[str, _Model] = {}
        # Every replica's demand per minute, flushed to Redis every `demand_flush_s`.
        self.demand = SharedDemand(self.redis, prefix, timeout_s)
        self.demand_flush_s = demand_flush_s
        self.replicas: dict[str, int] = {}  # model -> replicas seen, this one included
        self.alone = False  # Redis has not answered for `stale_s`: deciding alone
        self._seq = 0
        self.log = structlog.get_logger("fairway.state")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        last_ok = flushed = loop.time()
        while True:
            if loop.time() - flushed >= self.demand_flush_s:
                flushed = loop.time()
                with contextlib.suppress(*self._errors):  # kept for the next flush
                    await self.demand.flush()
            ok = True
            for model in list(dict.fromkeys(self.models())):
                try:
                    await self.sync(model)
                except self._errors as exc:
                    ok = False
                    if not self.alone and loop.time() - last_ok > self.stale_s:
                        self.log.error("shared_fairness_down", error=str(exc) or type(exc).__name__,
                                       deciding="alone")  # fmt: skip
                        self._go_alone()
            if ok:
                last_ok = loop.time()
                if self.alone:
                    self.alone = False
                    self.log.warning("shared_fairness_up")
            if self.on_replicas is not None:
                self.on_replicas(0 if self.alone else max(self.replicas.values(), default=1))
            await asyncio.sleep(self.interval_s)

    def _go_alone(self) -> None:
        self.alone = True
        for model in self.state:
            p = self.policy(model)
            if isinstance(p, Vtc):
                p.remote = frozenset()
        for load in self.loads().values():
            load.others = load.others_kv_tokens = load.guaranteed = 0
        self.replicas.clear()

    def _payload(self, model: str, p: FairnessPolicy) -> tuple[str, list[Triple]] | None:
        """The counter growth since the last sync, counted as sent from now on. A counter
        set outright (lifted, rebased) goes as that value, applied as a maximum or minimum,
        plus what it grew by since."""
        if not isinstance(p, Vtc):
            return None
        st = self.state.setdefault(model, _Model())
        marks = p.take_marks()
        triples: list[Triple] = []
        for tenant, value in p.served.items():
            mark = marks.get(tenant)
            inc = value - (mark[1] if mark else st.base.get(tenant, 0.0))
            if inc or mark:
                triples.append((tenant, inc, mark))
                st.base[tenant] = value
        if not triples:
            return None
        self._seq += 1
        return f"{self.replica}:{self._seq}", triples

    async def sync(self, model: str) -> None:
        """One exchange with Redis for `model`; raises the Redis client's errors."""
        p = self.policy(model)
        st = self.state.setdefault(model, _Model())
        if st.pending is None:
            st.pending = self._payload(model, p)
        op, triples = st.pending or ("", [])
        engines = list(self.engines_of(model))
        loads = self.loads()
        mine = {e: [ld.requests, ld.kv_tokens] for e in engines if (ld := loads.get(e))}
        waiting = p.backlogged()
        # Whether requests wait here that could start: a replica holding back its tenants
        # for those waiting elsewhere leaves its share to the others.
        ready = any(p.may_start(t, 0.0) for t in waiting)
        presence = orjson.dumps({"w": waiting, "b": ready, "l": mine}).decode()
        argv: list[str] = [self.replica, repr(self.stale_s), presence, op]
        for tenant, inc, mark in triples:
            argv += [tenant, repr(inc), "" if mark is None else f"{mark[0]} {mark[1]!r}"]
        pre = f"{self.prefix}fair:{model}:"
        keys = [pre + "served", pre + "replicas", pre + "sync:" + (op or "-")]
        async with asyncio.timeout(self.timeout_s * 2):
            counters, others = await self._sync(keys=keys, args=argv)
        st.pending = None
        self._apply(model, p, st, counters, others, engines)
        self.poll(model)

    def _apply(
        self,
        model: str,
        p: FairnessPolicy,
        st: _Model,
        counters: list[bytes],
        others: list[bytes],
        engines: list[str],
    ) -> None:
        waiting: set[str] = set()
        peers: dict[str, tuple[bool, dict[str, list[int]]]] = {}
        for i in range(0, len(others), 2):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                seen = orjson.loads(others[i + 1])
                waiting.update(t for t in seen.get("w", ()) if isinstance(t, str))
                peers[others[i].decode()] = (bool(seen.get("b")), seen.get("l", {}))
        self.replicas[model] = len(peers) + 1
        ranked = sorted([self.replica, *peers])
        n, loads = len(ranked), self.loads()
        for j, e in enumerate(engines):
            ld = loads.get(e)
            if ld is None:
                continue
            limit = ld.limit.max_running

            def share(replica: str, j: int = j, limit: int = limit) -> int:
                # The remainder goes to different replicas at different engines.
                return limit // n + (1 if (ranked.index(replica) + j) % n < limit % n else 0)

            requests = kv = 0
            for r, (ready, held) in peers.items():
                req, kv_r = (int(x) for x in held.get(e, (0, 0)))
                requests += max(req, share(r)) if ready else req
                kv += kv_r
            ld.others, ld.others_kv_tokens = requests, kv
            ld.guaranteed = share(self.replica) if peers else 0
        if isinstance(p, Vtc):
            shared = {counters[i].decode(): float(counters[i + 1])
                      for i in range(0, len(counters), 2)}  # fmt: skip
            for tenant, value in shared.items():
                # What grew here since this sync was built stays on top of the shared value.
                since = p.served.get(tenant, 0.0) - st.base.get(tenant, 0.0)
                p.served[tenant] = value + since
                st.base[tenant] = value
            p.remote = frozenset(waiting)
            p.rebase()

    async def close(self) -> None:
        """Leave the others' view at once (rather than after `stale_s`)."""
        with contextlib.suppress(*self._errors):
            async with asyncio.timeout(self.timeout_s * 2):
                for model in self.state:
                    await self.redis.hdel(f"{self.prefix}fair:{model}:replicas", self.replica)
        await self.redis.aclose()
