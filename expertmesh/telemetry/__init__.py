"""Observability: OpenTelemetry traces across gateway, expert and engine; Prometheus metrics.

A process calls :func:`start_telemetry` once at start and ``stop()`` on the result when it
stops (so the last spans are exported). Tracing follows the standard ``OTEL_*`` variables
(see :mod:`expertmesh.telemetry.tracing`) and is off unless they ask for it; the metrics
endpoint is on when the config gives a ``metrics_port`` (an expert's also serves vLLM's own
``vllm:*`` engine metrics, :mod:`expertmesh.telemetry.engine_metrics`). Per-request instrumentation is in
:mod:`expertmesh.telemetry.requests`, the metric objects in :mod:`expertmesh.telemetry.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .attempt import Attempt, attempt_span
from .engine_metrics import EngineMetrics
from .load import traced_load
from .metrics import (
    REGISTRY,
    MetricsServer,
    record_ejection,
    record_failover,
    record_route,
    start_metrics_server,
    watch_expert,
    watch_replicas,
)
from .requests import (
    Identity,
    current_request,
    expert_generate,
    gateway_generate,
    note_route,
    set_identity,
    trace_headers,
)
from .tracing import setup_tracing, shutdown_tracing, tracing_enabled

__all__ = [
    "Attempt",
    "Identity",
    "Telemetry",
    "attempt_span",
    "current_request",
    "expert_generate",
    "gateway_generate",
    "note_route",
    "record_ejection",
    "record_failover",
    "record_route",
    "service_name",
    "set_identity",
    "setup_tracing",
    "shutdown_tracing",
    "start_metrics_server",
    "start_telemetry",
    "trace_headers",
    "traced_load",
    "tracing_enabled",
    "watch_expert",
    "watch_replicas",
]


@dataclass
class Telemetry:
    """What :func:`start_telemetry` started; ``stop()`` flushes spans and closes the endpoint."""

    tracing: bool
    metrics: MetricsServer | None

    def stop(self) -> None:
        """Export the spans still queued, stop the exporters and the metrics endpoint."""
        try:
            if self.tracing:  # only the provider this process set up (tests may install their own)
                shutdown_tracing()
        finally:
            if self.metrics is not None:
                self.metrics.stop()


def service_name(identity: Identity) -> str:
    """``expertmesh-gateway`` or ``expertmesh-expert-<expert_id>``."""
    if identity.role == "expert":
        return f"expertmesh-expert-{identity.expert_id}"
    return f"expertmesh-{identity.role}"


def start_telemetry(
    identity: Identity,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    environ: Mapping[str, str] | None = None,
) -> Telemetry:
    """Set up tracing from the environment and the metrics endpoint for this process."""
    set_identity(identity)
    attributes = {"expertmesh.role": identity.role}
    if identity.expert_id:
        attributes["expertmesh.expert_id"] = identity.expert_id
    tracing = setup_tracing(service_name(identity), attributes, environ)
    if identity.role == "expert" and identity.expert_id and metrics_port is not None:
        REGISTRY.register(EngineMetrics(identity.expert_id))  # vLLM's vllm:* beside ours
    return Telemetry(tracing, start_metrics_server(metrics_port, metrics_host))
