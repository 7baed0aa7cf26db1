"""The `kubernetes` actuator: one Deployment per (model, region, GPU type), whose replicas are
the engines, scaled through the Deployment's `scale` subresource with kubernetes_asyncio."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
import structlog

from planner.actuators import Base
from planner.controller import Decision, EngineRecord
from planner.problem import Key

log = structlog.get_logger("fairway.planner")

_DNS = re.compile(r"[^a-z0-9.-]+")


def deployment_name(template: str, key: Key) -> str:
    """The Deployment of a (model, region, GPU type): lower case, other characters as '-'."""
    model, region, gpu = key
    name = template.format(model=model, region=region, gpu=gpu, id="", port="")
    return _DNS.sub("-", name.lower()).strip("-.")[:253]


class KubernetesActuator(Base):
    """One Deployment per (model, region, GPU type); its replicas are the engines. Scaling
    down leaves the choice of pod, and its graceful drain, to Kubernetes. A Deployment that
    is missing, or a scale that is refused, is reported as engines that failed to start."""

    kind = "kubernetes"

    def __init__(
        self,
        keys: Iterable[Key],
        clock: Callable[[], float],
        namespace: str = "default",
        deployment: str = "fairway-{model}-{region}-{gpu}",
        kubeconfig: str = "",
        context: str = "",
    ) -> None:
        super().__init__(keys, clock)
        self.namespace = namespace
        self.template = deployment
        self.kubeconfig = kubeconfig
        self.context = context
        self._client: Any = None
        self._apps: Any = None
        # Start times of the replicas this actuator asked for, oldest first; others count old.
        self.started: dict[Key, list[float]] = defaultdict(list)

    async def _api(self) -> Any:
        if self._apps is None:
            from kubernetes_asyncio import client, config

            conf = client.Configuration()
            if self.kubeconfig:
                await config.load_kube_config(config_file=self.kubeconfig,
                                              context=self.context or None,
                                              client_configuration=conf)  # fmt: skip
            else:
                config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
            self._client = client.ApiClient(conf)
            self._apps = client.AppsV1Api(self._client)
        return self._apps

    async def replicas(self, key: Key) -> tuple[int, int] | None:
        """(asked for, running) of the key's Deployment; None when it does not exist."""
        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._api()
        try:
            scale = await api.read_namespaced_deployment_scale(
                deployment_name(self.template, key), self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        spec = int(scale.spec.replicas or 0) if scale.spec is not None else 0
        status = int(scale.status.replicas or 0) if scale.status is not None else 0
        return spec, status

    async def engines(self) -> list[EngineRecord]:
        out = []
        for key in sorted(self.keys):
            got = await self.replicas(key)
            if got is None:
                continue
            spec, running = got
            known = self.started[key][-spec:] if spec else []
            starts = [0.0] * (spec - len(known)) + known
            name = deployment_name(self.template, key)
            for i, at in enumerate(starts):
                status = "serving" if i < running else "starting"
                out.append(EngineRecord(f"{name}#{i}", *key, at, status))  # type: ignore[arg-type]
        return out

    async def apply(self, decision: Decision) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        delta: dict[Key, int] = defaultdict(int)
        for s in decision.starts:
            delta[s.key] += s.count
        for d in decision.drains:
            delta[d.model, d.region, d.gpu] -= 1
        api = await self._api()
        for key, change in sorted(delta.items()):
            if not change:
                continue
            name = deployment_name(self.template, key)
            try:
                got = await self.replicas(key)
                if got is None:
                    raise LookupError(f"deployment {self.namespace}/{name} not found")
                target = max(0, got[0] + change)
                await api.patch_namespaced_deployment_scale(
                    name, self.namespace, {"spec": {"replicas": target}}
                )
            except (ApiException, LookupError, OSError, aiohttp.ClientError) as exc:
                why = exc.reason if isinstance(exc, ApiException) else str(exc)
                log.warning("planner_scale_failed", deployment=name, why=why)
                for i in range(max(change, 0)):
                    self._fail(EngineRecord(f"{name}#new{i}", *key, self.clock(), "failed"),
                               f"scale of {self.namespace}/{name}: {why}")  # fmt: skip
                continue
            now = self.clock()
            times = self.started[key]
            if change > 0:
                times += [now] * change
            else:
                del times[max(0, len(times) + change) :]
            log.info("planner_scaled", deployment=name, replicas=target)

    async def close(self) -> None:
        await super().close()
        if self._client is not None:
            await self._client.close()
            self._client = self._apps = None
