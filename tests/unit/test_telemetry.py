"""Telemetry without engines: env handling, propagation, log lines, metrics, and the gateway's spans.

The gateway runs in-process over fake experts (real gRPC servers) with an in-memory span
exporter, so the parent/child links and failover accounting are checked without vLLM; the
same links across real processes and a real OTLP receiver are checked in test_telemetry_mesh.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.client import MeshClient
from expertmesh.config import load_config
from expertmesh.gateway.server import serve
from expertmesh.logs import RequestContextFilter, make_formatter, request_context, setup_logging
from expertmesh.telemetry import metrics, tracing
from expertmesh.telemetry.load import traced_load
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..fakes import TracedFakeExpert as FakeExpert
from ..fakes import serve_fake
from ..support import free_port, wait_serving

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


# --- environment -> exporters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["otlp_proto_grpc"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp_proto_grpc"]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp_proto_grpc"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ["otlp_proto_http"],
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
            },
            ["otlp_proto_grpc"],
        ),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp_proto_grpc"]),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_exporters_follow_the_standard_otel_variables(env: dict[str, str], expected: list[str]) -> None:
    assert tracing.exporter_names(env) == expected


def test_exporter_classes_and_errors(tmp_path: Path) -> None:
    grpc_exp, http_exp, console = tracing.build_exporters(
        ["otlp_proto_grpc", "otlp_proto_http", "console"], {}
    )
    assert isinstance(grpc_exp, GrpcExporter) and isinstance(http_exp, HttpExporter)
    assert isinstance(console, ConsoleSpanExporter)
    with pytest.raises(tracing.TracingConfigError, match="'zipkin'"):
        tracing.build_exporters(["zipkin"], {})
    with pytest.raises(tracing.TracingConfigError, match="'thrift' is not one of grpc, http/protobuf"):
        tracing.exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})
    # Nothing configured: setup leaves the no-op provider in place.
    assert tracing.setup_tracing("expertmesh-test", environ={}) is False
    assert not tracing.tracing_enabled()
    # The console exporter can write one JSON span per line to a file, for local use.
    out = tmp_path / "spans.jsonl"
    (exporter,) = tracing.build_exporters(["console"], {tracing.TRACES_FILE_ENV: str(out)})
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("t").start_span("one").end()
    provider.shutdown()
    assert json.loads(out.read_text().splitlines()[0])["name"] == "one"


def test_service_name_defaults_to_the_process_unless_the_environment_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    resource = tracing.make_resource("expertmesh-gateway", {"expertmesh.role": "gateway"})
    assert resource.attributes["service.name"] == "expertmesh-gateway"
    assert resource.attributes["expertmesh.role"] == "gateway"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-gateway")
    assert tracing.make_resource("expertmesh-gateway").attributes["service.name"] == "edge-gateway"


# --- propagation --------------------------------------------------------------------------------


def test_caller_context_is_read_from_metadata_and_replaced_on_the_way_out() -> None:
    ctx = tracing.context_from_metadata([("traceparent", TRACEPARENT), ("x-request-id", "r1")])
    span_context = trace.get_current_span(ctx).get_span_context()
    assert format(span_context.trace_id, "032x") == CALLER_TRACE
    assert format(span_context.span_id, "016x") == CALLER_SPAN
    assert span_context.is_remote

    child = SpanContext(int(CALLER_TRACE, 16), 0x1122334455667788, False, TraceFlags(1))
    out = dict(
        tracing.inject_metadata(
            [("traceparent", TRACEPARENT), ("x-request-id", "r1")],
            trace.set_span_in_context(NonRecordingSpan(child)),
        )
    )
    assert out == {"x-request-id": "r1", "traceparent": f"00-{CALLER_TRACE}-1122334455667788-01"}
    assert tracing.context_from_metadata([("traceparent", "garbage")]) is not None
    assert tracing.trace_id_of(tracing.context_from_metadata(None)) is None


def test_vllm_trace_headers_only_when_the_engine_traces() -> None:
    ctx = tracing.context_from_metadata([("traceparent", TRACEPARENT), ("tracestate", "vendor=x")])

    class Engine:
        class observability_config:  # the name vLLM uses
            otlp_traces_endpoint: str | None = None

    assert tracing.vllm_trace_headers(Engine(), ctx) is None  # vLLM would warn on every request
    Engine.observability_config.otlp_traces_endpoint = "http://collector:4317"
    assert tracing.vllm_trace_headers(Engine(), ctx) == {"traceparent": TRACEPARENT, "tracestate": "vendor=x"}


# --- logs ---------------------------------------------------------------------------------------


def _logger(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(make_formatter(fmt))
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger(f"test-telemetry-{fmt}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_json_lines_carry_request_id_and_trace_id() -> None:
    logger, out = _logger("json")
    logger.info("before")
    with request_context("req-7", CALLER_TRACE):
        logger.info("routed %s", "code")
    span = NonRecordingSpan(SpanContext(int(CALLER_TRACE, 16), 1, False, TraceFlags(1)))
    with trace.use_span(span):  # no request context: the current span's trace id is used
        logger.warning("inside a span")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["message"], x["request_id"], x["trace_id"]) for x in lines] == [
        ("before", None, None),
        ("routed code", "req-7", CALLER_TRACE),
        ("inside a span", None, CALLER_TRACE),
    ]
    assert {"time", "level", "logger"} <= set(lines[0])
    assert lines[1]["level"] == "INFO" and lines[1]["logger"] == "test-telemetry-json"


def test_text_lines_show_the_request_only_while_there_is_one() -> None:
    logger, out = _logger("text")
    logger.info("idle")
    with request_context("req-8", CALLER_TRACE):
        logger.info("busy")
    idle, busy = out.getvalue().splitlines()
    assert idle.endswith("idle")
    assert busy.endswith(f"busy [request_id=req-8 trace_id={CALLER_TRACE}]")


def test_unknown_log_format_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPERTMESH_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="EXPERTMESH_LOG_FORMAT must be one of text, json, got 'xml'"):
        setup_logging()


# --- metrics ------------------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_metric_functions_and_the_endpoint() -> None:
    before = _sample("expertmesh_failovers_total", from_expert="a", to_expert="b")
    metrics.record_failover("a", "b")
    metrics.record_route("code", "keywords")
    metrics.record_ejection("a")
    metrics.record_model_load("unit-expert", 12.5, "ok")
    metrics.watch_expert("unit-expert", lambda: pb.EXPERT_STATE_LOADING, lambda: 3)
    metrics.watch_replicas(lambda: [("unit-expert", "10.0.0.1:50051", "SERVING", True)])
    assert _sample("expertmesh_failovers_total", from_expert="a", to_expert="b") == before + 1
    port = free_port()
    server = metrics.start_metrics_server(port, "127.0.0.1")
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port} .metrics_port.: "):
            metrics.start_metrics_server(port, "127.0.0.1")
    finally:
        server.stop()
        metrics.watch_replicas(list)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("expertmesh_routing_decisions_total", (("domain", "code"), ("signal", "keywords")))] >= 1
    assert samples[("expertmesh_ejections_total", (("expert", "a"),))] >= 1
    assert samples[("expertmesh_queue_depth", (("expert", "unit-expert"),))] == 3
    assert samples[("expertmesh_expert_state", (("expert", "unit-expert"), ("state", "LOADING")))] == 1
    assert samples[("expertmesh_expert_state", (("expert", "unit-expert"), ("state", "READY")))] == 0
    replica = (("expert", "unit-expert"), ("replica", "10.0.0.1:50051"))
    assert samples[("expertmesh_expert_health", (*replica, ("status", "SERVING")))] == 1
    assert samples[("expertmesh_replica_ejected", replica)] == 1
    load = (("expert", "unit-expert"), ("outcome", "ok"))
    assert samples[("expertmesh_model_load_seconds_count", load)] >= 1
    for name in ("expertmesh_time_to_first_token_seconds", "expertmesh_time_per_output_token_seconds"):
        assert families[name].type == "histogram"
    assert metrics.start_metrics_server(None) is None
    with pytest.raises(ValueError, match="metrics_port must be > 0"):
        metrics.start_metrics_server(0)


# --- spans in-process ---------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Record expertmesh's spans in memory for one test (tracing back off afterwards)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, set_global=False)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


def _hex(span: ReadableSpan) -> tuple[str, str, str]:
    """(trace id, span id, parent span id) as hex; parent "" for a root."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = format(span.parent.span_id, "016x") if span.parent else ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"), parent


async def test_expert_load_span_and_metric(spans: InMemorySpanExporter) -> None:
    class Host:
        def __init__(self, fail: bool) -> None:
            self.cfg = type("Cfg", (), {"expert_id": "load-test", "model_path": "/models/m"})()
            self.fail = fail

        @traced_load
        async def load(self) -> None:
            if self.fail:
                raise RuntimeError("out of memory while loading")

    failed_before = _sample("expertmesh_model_load_seconds_count", expert="load-test", outcome="failed")
    await Host(fail=False).load()
    with pytest.raises(RuntimeError):
        await Host(fail=True).load()
    ok, failed = spans.get_finished_spans()
    assert ok.name == failed.name == "expert.load"
    assert ok.attributes is not None and failed.attributes is not None
    assert ok.attributes["expertmesh.load.outcome"] == "ok"
    assert ok.attributes["gen_ai.request.model"] == "/models/m"
    assert "expertmesh.load.duration_s" in ok.attributes
    assert failed.attributes["expertmesh.load.outcome"] == "failed"
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "RuntimeError: out of memory while loading"
    assert [e.name for e in failed.events] == ["exception"]
    assert _sample("expertmesh_model_load_seconds_count", expert="load-test", outcome="failed") == (
        failed_before + 1
    )


@contextlib.asynccontextmanager
async def mesh_of_fakes(tmp_path: Path, experts: list[FakeExpert]) -> AsyncIterator[str]:
    """The real gateway, in-process, over fake experts; code falls back to general."""
    servers, entries = [], []
    for expert in experts:
        server, port, _ = await serve_fake(expert)
        servers.append(server)
        entries.append(
            {
                "expert_id": expert.expert_id,
                "domain": expert.expert_id,
                "model_path": "/unused",
                "address": f"127.0.0.1:{port}",
            }
        )
    port = free_port()
    path = tmp_path / "mesh.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": {"host": "127.0.0.1", "port": port},
                "grace_period_s": 1,
                "routing": {"fallbacks": {"code": ["general"]} if len(experts) > 1 else {}},
                "experts": entries,
            }
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(load_config(path), path, stop=stop))
    try:
        await wait_serving(f"127.0.0.1:{port}", timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        await task
        for server in servers:
            await server.stop(0)


async def test_gateway_spans_follow_the_caller_and_each_attempt(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """Caller -> gateway.generate -> gateway.attempt (failed, then failover) -> the experts' GenAI spans."""
    code = FakeExpert("code", fail=grpc.StatusCode.UNAVAILABLE)
    general = FakeExpert("general")
    failovers = _sample("expertmesh_failovers_total", from_expert="code", to_expert="general")
    ok_requests = _sample(
        "expertmesh_requests_total", role="gateway", expert="general", domain="code", code="OK"
    )
    ttft = _sample("expertmesh_time_to_first_token_seconds_count", role="gateway", expert="general")
    async with mesh_of_fakes(tmp_path, [code, general]) as address, grpc.aio.insecure_channel(address) as ch:
        call = pb_grpc.GatewayStub(ch).Generate(
            pb.GenerateRequest(request_id="r-42", prompt="x", domain="code"),
            metadata=(("traceparent", TRACEPARENT), ("x-request-id", "r-42")),
        )
        messages = [m async for m in call]
    assert "".join(m.text for m in messages) == "t0t1t2"

    finished = spans.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for s in finished:
        by_name.setdefault(s.name, []).append(s)
    (request,) = by_name["gateway.generate"]
    failed, served = sorted(by_name["gateway.attempt"], key=lambda s: s.start_time or 0)
    # the experts' spans are named as the GenAI conventions say: "{operation} {model}"
    experts = [s for s in finished if s.name == f"text_completion {s.attributes.get('gen_ai.request.model')}"]
    failed_expert, served_expert = sorted(experts, key=lambda s: s.start_time or 0)
    assert {_hex(s)[0] for s in finished} == {CALLER_TRACE}
    assert _hex(request)[2] == CALLER_SPAN and request.kind == SpanKind.SERVER
    assert _hex(failed)[2] == _hex(served)[2] == _hex(request)[1]
    assert failed.kind == served.kind == SpanKind.CLIENT
    assert _hex(failed_expert)[2] == _hex(failed)[1]
    assert failed_expert.attributes is not None
    assert failed_expert.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed_expert.status.description == "UNAVAILABLE: code cannot take it"
    assert _hex(served_expert)[2] == _hex(served)[1]

    assert request.attributes is not None and failed.attributes is not None and served.attributes is not None
    assert request.attributes["expertmesh.route.domain"] == "code"
    assert request.attributes["expertmesh.route.signal"] == "domain"
    assert request.attributes["expertmesh.route.confidence"] == 1.0
    assert request.attributes["expertmesh.request_id"] == "r-42"
    assert request.attributes["expertmesh.expert_id"] == "general"
    assert request.attributes["expertmesh.attempts"] == 2
    assert request.attributes["rpc.grpc.status_code"] == 0
    assert request.attributes["gen_ai.usage.output_tokens"] == 3
    assert failed.attributes["expertmesh.expert_id"] == "code"
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert failed.attributes["expertmesh.attempt.outcome"] == "error"
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.status.description == "UNAVAILABLE: code cannot take it"
    assert served.attributes["expertmesh.attempt.outcome"] == "ok"
    assert served.attributes["expertmesh.failover_from"] == "code"
    assert served.attributes["server.address"] == "127.0.0.1"
    # what reached the expert: the attempt's context, not the caller's, and the request id
    assert general.metadata[0]["traceparent"] == f"00-{CALLER_TRACE}-{_hex(served)[1]}-01"
    assert general.metadata[0]["x-request-id"] == "r-42"

    assert _sample("expertmesh_failovers_total", from_expert="code", to_expert="general") == failovers + 1
    assert (
        _sample("expertmesh_requests_total", role="gateway", expert="general", domain="code", code="OK")
        == ok_requests + 1
    )
    assert (
        _sample("expertmesh_time_to_first_token_seconds_count", role="gateway", expert="general") == ttft + 1
    )


async def test_caller_errors_and_tracing_off(tmp_path: Path) -> None:
    """Tracing off: the caller's trace context still reaches the expert; errors are counted."""
    general = FakeExpert("general")
    not_found = _sample("expertmesh_requests_total", role="gateway", expert="", domain="", code="NOT_FOUND")
    async with mesh_of_fakes(tmp_path, [general]) as address:
        async with MeshClient(address, timeout=10) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete("x", domain="law")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        async with grpc.aio.insecure_channel(address) as ch:
            call = pb_grpc.GatewayStub(ch).Generate(
                pb.GenerateRequest(prompt="x"), metadata=(("traceparent", TRACEPARENT),)
            )
            _ = [m async for m in call]
    assert not tracing.tracing_enabled()
    assert general.metadata[0]["traceparent"] == TRACEPARENT
    assert (
        _sample("expertmesh_requests_total", role="gateway", expert="", domain="", code="NOT_FOUND")
        == not_found + 1
    )
