"""Prometheus metrics of one process (gateway or expert), served on ``metrics_port`` from the config.

Every metric is named ``expertmesh_*`` and lives in :data:`REGISTRY` (not prometheus_client's
global one, so vLLM's own metrics never collide with these). ``role`` is ``gateway`` or ``expert``.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from expertmesh.v1 import expertmesh_pb2 as pb

log = logging.getLogger(__name__)

#: The registry the metrics endpoint serves.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_LOAD_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)

REQUESTS = Counter(
    "expertmesh_requests",
    "Generate requests finished, by the gRPC status code they ended with.",
    ["role", "expert", "domain", "code"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "expertmesh_gateway_api_requests",
    "Gateway Generate requests finished, by front (grpc, openai) and the gRPC status code.",
    ["api", "code"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "expertmesh_request_duration_seconds",
    "Generate: from receiving the request to the end of its stream.",
    ["role", "expert"],
    buckets=_DURATION_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    "expertmesh_time_to_first_token_seconds",
    "From receiving the request to sending its first token.",
    ["role", "expert"],
    buckets=_TTFT_BUCKETS,
    registry=REGISTRY,
)
TPOT = Histogram(
    "expertmesh_time_per_output_token_seconds",
    "Per request: (last token time - first token time) / (tokens - 1).",
    ["role", "expert"],
    buckets=_TPOT_BUCKETS,
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "expertmesh_generated_tokens", "Completion tokens generated.", ["expert"], registry=REGISTRY
)
PROMPT_TOKENS = Counter("expertmesh_prompt_tokens", "Prompt tokens processed.", ["expert"], registry=REGISTRY)
STREAMS_IN_FLIGHT = Gauge(
    "expertmesh_streams_in_flight",
    "Generate streams open now (gateway: per expert being tried).",
    ["role", "expert"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "expertmesh_queue_depth",
    "Requests the expert's engine has not finished (running and waiting).",
    ["expert"],
    registry=REGISTRY,
)
MAX_QUEUE = Gauge(
    "expertmesh_max_queue",
    "The expert's max_queue: more unfinished requests than this are refused (RESOURCE_EXHAUSTED).",
    ["expert"],
    registry=REGISTRY,
)
ROUTING_DECISIONS = Counter(
    "expertmesh_routing_decisions",
    "Gateway routing decisions by chosen domain and the signal that decided it.",
    ["domain", "signal"],
    registry=REGISTRY,
)
FAILOVERS = Counter(
    "expertmesh_failovers",
    "Requests moved to another expert after one could not take them.",
    ["from_expert", "to_expert"],
    registry=REGISTRY,
)
EJECTIONS = Counter(
    "expertmesh_ejections", "Experts (replicas) taken out of rotation.", ["expert"], registry=REGISTRY
)
TENANT_ADMISSIONS = Counter(
    "expertmesh_tenant_admissions",
    "Gateway requests per tenant by admission outcome (admitted, domain, streams, tokens).",
    ["tenant", "outcome"],
    registry=REGISTRY,
)
TENANT_TOKENS = Counter(
    "expertmesh_tenant_tokens",
    "Tokens charged to a tenant (prompt + completion).",
    ["tenant"],
    registry=REGISTRY,
)
TENANT_STREAMS = Gauge(
    "expertmesh_tenant_streams_in_flight", "Open Generate streams per tenant.", ["tenant"], registry=REGISTRY
)
MODEL_LOAD = Histogram(
    "expertmesh_model_load_seconds",
    "Engine (model) load time, by outcome (ok, failed, cancelled).",
    ["expert", "outcome"],
    buckets=_LOAD_BUCKETS,
    registry=REGISTRY,
)

STATE_NAMES = tuple(
    v.name.removeprefix("EXPERT_STATE_") for v in pb.ExpertState.DESCRIPTOR.values if v.number != 0
)


def state_name(state: int | str) -> str:
    """``READY`` for ``pb.EXPERT_STATE_READY`` (names pass through)."""
    if isinstance(state, str):
        return state.removeprefix("EXPERT_STATE_")
    return pb.ExpertState.Name(state).removeprefix("EXPERT_STATE_")  # type: ignore[arg-type]


@dataclass
class _Watched:
    state: Callable[[], int | str]
    queue_depth: Callable[[], int] | None


#: (expert_id, replica address, grpc.health.v1 status name, ejected) for each replica.
ReplicaRow = tuple[str, str, str, bool]
HEALTH_STATUSES = ("SERVING", "NOT_SERVING", "UNKNOWN")


class _StateCollector(Collector):
    """Reads state at scrape time, so that no state transition has to remember to update a gauge."""

    def __init__(self) -> None:
        self.experts: dict[str, _Watched] = {}
        self.replicas: Callable[[], Iterable[ReplicaRow]] | None = None
        self.lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.lock:
            experts = dict(self.experts)
            replicas = self.replicas
        if experts:
            family = GaugeMetricFamily(
                "expertmesh_expert_state",
                "Lifecycle state of the expert's engine: 1 for the current state.",
                labels=["expert", "state"],
            )
            for expert, watched in experts.items():
                current = _safe(functools.partial(_state_of, watched), "UNKNOWN")
                for name in STATE_NAMES:
                    family.add_metric([expert, name], 1.0 if name == current else 0.0)
            yield family
        if replicas is not None:
            yield from _replica_families(replicas)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def _replica_families(read: Callable[[], Iterable[ReplicaRow]]) -> Iterator[GaugeMetricFamily]:
    try:
        rows = list(read())
    except Exception:  # a scrape must never fail because one callback did
        log.debug("metrics callback failed", exc_info=True)
        return
    health = GaugeMetricFamily(
        "expertmesh_expert_health",
        "The gateway's view of each expert replica's grpc.health.v1 status: 1 for the current one.",
        labels=["expert", "replica", "status"],
    )
    ejected = GaugeMetricFamily(
        "expertmesh_replica_ejected",
        "1 while the gateway keeps the replica out of rotation after repeated failures.",
        labels=["expert", "replica"],
    )
    for expert, replica, status, out in rows:
        for name in dict.fromkeys((*HEALTH_STATUSES, status)):
            health.add_metric([expert, replica, name], 1.0 if name == status else 0.0)
        ejected.add_metric([expert, replica], 1.0 if out else 0.0)
    yield health
    yield ejected


def _state_of(watched: _Watched) -> str:
    return state_name(watched.state())


def _safe(read: Callable[[], str], default: str) -> str:
    try:
        return read()
    except Exception:  # a scrape must never fail because one callback did
        log.debug("metrics callback failed", exc_info=True)
        return default


_STATES = _StateCollector()
REGISTRY.register(_STATES)


def watch_expert(
    expert: str,
    state: Callable[[], int | str],
    queue_depth: Callable[[], int] | None = None,
    max_queue: int | None = None,
) -> None:
    """Export ``expertmesh_expert_state`` (and ``expertmesh_queue_depth``, ``expertmesh_max_queue``),
    read at scrape time."""
    with _STATES.lock:
        _STATES.experts[expert] = _Watched(state, queue_depth)
    if max_queue is not None:
        MAX_QUEUE.labels(expert).set(max_queue)
    if queue_depth is not None:

        def depth() -> float:
            try:
                return float(queue_depth())
            except Exception:  # a scrape must never fail because one callback did
                return 0.0

        QUEUE_DEPTH.labels(expert).set_function(depth)


def watch_replicas(read: Callable[[], Iterable[ReplicaRow]]) -> None:
    """Gateway: export ``expertmesh_expert_health`` and ``expertmesh_replica_ejected``, read at scrape."""
    with _STATES.lock:
        _STATES.replicas = read


def record_route(domain: str, signal: str) -> None:
    """Count one routing decision (``signal``: expert_id, domain, default, classifier, ...)."""
    ROUTING_DECISIONS.labels(domain, signal).inc()


def record_failover(from_expert: str, to_expert: str) -> None:
    """Count a request moving from one expert to the next one tried."""
    FAILOVERS.labels(from_expert, to_expert).inc()


def record_ejection(expert: str) -> None:
    """Count an expert (replica) taken out of rotation."""
    EJECTIONS.labels(expert).inc()


def record_model_load(expert: str, seconds: float, outcome: str) -> None:
    """Observe one engine load and how it ended."""
    MODEL_LOAD.labels(expert, outcome).observe(seconds)


@dataclass
class MetricsServer:
    """The running ``/metrics`` endpoint."""

    port: int
    _stop: Callable[[], None]

    def stop(self) -> None:
        """Stop serving."""
        self._stop()


def start_metrics_server(port: int | None, host: str = "0.0.0.0") -> MetricsServer | None:
    """Serve :data:`REGISTRY` at ``http://host:port/metrics``; None (off) when ``port`` is None."""
    if port is None:
        return None
    if port <= 0:
        raise ValueError(f"metrics_port must be > 0, got {port}")
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as e:
        raise OSError(f"cannot serve metrics on {host}:{port} (metrics_port): {e.strerror or e}") from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    log.info("metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(port, stop)
