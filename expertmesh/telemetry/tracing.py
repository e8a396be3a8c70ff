"""OpenTelemetry tracing for one process: set up from the standard ``OTEL_*`` variables, propagate.

Tracing is off (the API's no-op provider, near-zero cost) unless the environment asks for it:

``OTEL_TRACES_EXPORTER``
    Comma-separated exporters: ``otlp``, ``console`` or ``none``; ``otlp_proto_grpc`` /
    ``otlp_proto_http`` and any exporter installed under the ``opentelemetry_traces_exporter``
    entry point also work. Unset, ``otlp`` is used when an OTLP endpoint is set, else tracing is off.
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    Where the OTLP exporter sends (read by the exporter itself, like the headers, timeout and
    certificate variables).
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``
    ``grpc`` (the default of the Python SDK) or ``http/protobuf``.
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``
    Resource; without a service name the process's own (``expertmesh-gateway``,
    ``expertmesh-expert-<id>``) is used.
``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``
    Sampling, batching (``OTEL_BSP_SCHEDULE_DELAY`` in ms) and propagation, as the SDK defines them.
``OTEL_SDK_DISABLED=true``
    Off, whatever else is set.
``EXPERTMESH_TRACES_FILE``
    Local use: with the ``console`` exporter, append one JSON span per line to this file
    instead of writing to stdout.

Trace context travels in gRPC metadata (W3C ``traceparent``/``tracestate`` by default) and into
vLLM's ``trace_headers``, so that the gateway's, the expert's and vLLM's spans form one trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from typing import IO, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

#: Name of the instrumentation scope of every expertmesh span.
SCOPE = "expertmesh"
TRACES_FILE_ENV = "EXPERTMESH_TRACES_FILE"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
_W3C = TraceContextTextMapPropagator()

_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


class TracingConfigError(ValueError):
    """The ``OTEL_*`` variables ask for something that cannot be set up; the message names it."""


def exporter_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The trace exporters the environment asks for ([] = tracing off), ``otlp`` resolved by protocol."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        raw = "otlp" if any(env.get(v) for v in _ENDPOINT_VARS) else "none"
    names = [n.strip() for n in raw.split(",") if n.strip() and n.strip().lower() != "none"]
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    resolved = []
    for name in names:
        if name == "otlp":
            if protocol not in _OTLP_BY_PROTOCOL:
                raise TracingConfigError(
                    f"OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL={protocol!r} is not one of "
                    f"{', '.join(_OTLP_BY_PROTOCOL)}"
                )
            name = _OTLP_BY_PROTOCOL[protocol]
        resolved.append(name)
    return list(dict.fromkeys(resolved))


def _console_exporter(environ: Mapping[str, str]) -> SpanExporter:
    path = environ.get(TRACES_FILE_ENV)
    if not path:
        return ConsoleSpanExporter()
    out: IO[str] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives as long as the exporter)

    def one_line(span: ReadableSpan) -> str:
        return span.to_json(indent=None) + "\n"

    return ConsoleSpanExporter(out=out, formatter=one_line)


def build_exporters(names: Iterable[str], environ: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """Instantiate exporters by entry-point name; each reads its own ``OTEL_EXPORTER_*`` settings."""
    env = os.environ if environ is None else environ
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "console":
            exporters.append(_console_exporter(env))
            continue
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed "
                f"(known here: otlp, console, none)"
            )
        cls = next(iter(found)).load()
        exporters.append(cls())
    return exporters


def make_resource(service_name: str, attributes: Mapping[str, str] | None = None) -> Resource:
    """The process resource: the environment's, with ``service_name`` unless the environment names one."""
    resource = Resource.create(dict(attributes or {}))
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def install(provider: TracerProvider | None, *, set_global: bool = True) -> None:
    """Use ``provider`` for expertmesh's spans (None: back to no-op); tests pass their own."""
    global _provider, _tracer
    _provider = provider
    _tracer = provider.get_tracer(SCOPE) if provider is not None else trace.NoOpTracer()
    if provider is not None and set_global:
        # Global too, so that libraries in the process that trace (vLLM) share the exporters.
        trace.set_tracer_provider(provider)


def setup_tracing(
    service_name: str,
    attributes: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Configure tracing from the ``OTEL_*`` environment; True when spans will be exported.

    Nothing configured means no provider is created: spans are the API's non-recording ones,
    which still carry a caller's trace context through to the experts.
    """
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names:
        return False
    exporters = build_exporters(names, env)
    provider = TracerProvider(resource=make_resource(service_name, attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    log.info("tracing on: service %s, exporters %s", service_name, ", ".join(names))
    return True


def shutdown_tracing(timeout_ms: int = 5000) -> None:
    """Export the spans still queued and stop the exporters; call once when the process stops."""
    provider = _provider
    if provider is None:
        return
    try:
        provider.force_flush(timeout_ms)
    finally:
        provider.shutdown()
        install(None)


def tracing_enabled() -> bool:
    """True when spans are recorded and exported."""
    return _provider is not None


def tracer() -> trace.Tracer:
    """expertmesh's tracer (no-op while tracing is off)."""
    return _tracer


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    """The caller's trace context (``traceparent``/``tracestate``, baggage) from gRPC metadata."""
    carrier = {k.lower(): v for k, v in metadata or () if isinstance(v, str)}
    return propagate.extract(carrier)


def inject_metadata(
    metadata: Iterable[tuple[str, str | bytes]], context: Context
) -> tuple[tuple[str, str | bytes], ...]:
    """``metadata`` with the trace context of ``context`` added (any old trace headers replaced)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    kept = tuple((k, v) for k, v in metadata if k not in carrier)
    return (*kept, *carrier.items())


def w3c_headers(context: Context) -> dict[str, str]:
    """``traceparent``/``tracestate`` for ``context`` (empty when it holds no valid span)."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier


def vllm_trace_headers(engine: Any, context: Context) -> dict[str, str] | None:
    """The ``trace_headers`` for ``AsyncLLM.generate``: None while the engine's own tracing is off.

    vLLM traces only when started with ``otlp_traces_endpoint`` (engine_args); it warns on
    every request that carries headers otherwise, so none are passed then.
    """
    observability = getattr(engine, "observability_config", None)
    if getattr(observability, "otlp_traces_endpoint", None) is None:
        return None
    return w3c_headers(context) or None


def trace_id_of(context: Context | None = None) -> str | None:
    """The 32-hex-digit trace id of the span in ``context`` (or the current one), if valid."""
    span_context = trace.get_current_span(context).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None
