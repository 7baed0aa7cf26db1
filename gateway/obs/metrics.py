"""Prometheus metrics of the gateway, per tenant, model and engine, in the app's own registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


class RequestMetrics:
    """The children of one (tenant, model, engine), looked up once instead of per request."""

    def __init__(self, m: GatewayMetrics, labels: tuple[str, str, str]) -> None:
        self._requests = m.requests
        self._labels = labels
        self._by_status: dict[int, Any] = {}
        self.latency = m.latency.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.completion_tokens = m.completion_tokens.labels(*labels)

    def status(self, status: int) -> Any:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(*self._labels, str(status))
        return child


class GatewayMetrics:
    def __init__(self) -> None:
        self._per_request: dict[tuple[str, str, str], RequestMetrics] = {}
        self.registry = reg = CollectorRegistry()
        ProcessCollector(registry=reg)  # process_cpu_seconds_total, resident memory, start time
        tme = ["tenant", "model", "engine"]
        self.requests = Counter(
            "fairway_requests", "Requests answered, by final HTTP status.",
            [*tme, "status"], registry=reg,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "fairway_prompt_tokens", "Prompt tokens, as the engine reported them.", tme,
            registry=reg,
        )  # fmt: skip
        self.completion_tokens = Counter(
            "fairway_completion_tokens", "Completion tokens, as the engine reported them.", tme,
            registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "fairway_time_to_first_token_seconds", "Arrival at the gateway to first token relayed.",
            tme, buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "fairway_request_latency_seconds", "Arrival at the gateway to the last byte relayed.",
            tme, buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "fairway_upstream_errors", "Failed attempts to reach or use an engine.",
            [*tme, "kind"], registry=reg,
        )  # fmt: skip
        self.rejected = Counter(
            "fairway_rejected_requests",
            "Requests refused before reaching an engine, by HTTP status.",
            ["tenant", "status"], registry=reg,
        )  # fmt: skip
        self.engine_healthy = Gauge(
            "fairway_engine_healthy", "1 while the engine is admitted, 0 while ejected.",
            ["model", "engine", "region"], registry=reg,
        )  # fmt: skip
        self.in_flight = Gauge(
            "fairway_engine_in_flight", "Requests the gateway has open at the engine.",
            ["model", "engine", "region"], registry=reg,
        )  # fmt: skip

        self.throttled = Counter(
            "fairway_throttled_requests",
            "Requests refused with 429 by the token buckets while their model was overloaded.",
            ["tenant", "app"], registry=reg,
        )  # fmt: skip
        self.state_up = Gauge(
            "fairway_state_backend_up",
            "1 while the shared state backend (Redis) answers, 0 while buckets are local.",
            registry=reg,
        )
        self.replicas = Gauge(
            "fairway_replicas",
            "Gateway replicas sharing fairness through the state backend, this one included "
            "(0 while it cannot reach them).",
            registry=reg,
        )
        self.config_reloads = Counter(
            "fairway_config_reloads",
            "Config reloads (SIGHUP or POST /admin/reload) by result: ok or error.",
            ["result"], registry=reg,
        )  # fmt: skip
        self.dropped = Counter(
            "fairway_dropped_requests",
            "Requests that left the fairness queue without running (queue_full, timeout, "
            "client_gone).",
            ["tenant", "reason"], registry=reg,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "fairway_queue_depth", "Requests waiting in the fairness queue.",
            ["tenant", "model"], registry=reg,
        )  # fmt: skip
        self.batch_waiting = Gauge(
            "fairway_batch_waiting", "Batch requests waiting in the batch feed for a region "
            "with room.", ["model"], registry=reg,
        )  # fmt: skip
        self.batch_expired = Counter(
            "fairway_batch_expired", "Batch requests whose deadline passed while they waited "
            "(answered 408 batch_deadline_exceeded).", ["model"], registry=reg,
        )  # fmt: skip
        self.service = Gauge(
            "fairway_service_counter",
            "The fairness policy's counter of the tenant (weighted service units; vtc, wsc), "
            "or its requests started in the last minute (rpm).",
            ["tenant", "model"], registry=reg,
        )  # fmt: skip

    def of(self, tenant: str, model: str, engine: str) -> RequestMetrics:
        key = (tenant, model, engine)
        found = self._per_request.get(key)
        if found is None:
            found = self._per_request[key] = RequestMetrics(self, key)
        return found
