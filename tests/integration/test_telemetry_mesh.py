"""One trace across real processes: `expertmesh up` (gateway + one vLLM expert) -> a real OTLP receiver.

The processes export with the standard variables (OTLP over gRPC to the receiver this module
starts), vLLM's own tracing is on (``otlp_traces_endpoint``) so that its request span joins the
trace through ``trace_headers``, logs are JSON, and both processes serve /metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..otlp_receiver import OtlpReceiver, ReceivedSpan
from ..support import VENV_BIN, demo_expert, free_port, wait_serving, write_config

pytestmark = pytest.mark.engine
EXPERT = "general_tiny"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
MAX_TOKENS = 8


def expert_span(mesh: TracedMesh) -> str:
    """The expert's span name (OpenTelemetry GenAI conventions: "{operation} {model}")."""
    return f"text_completion {mesh.config.experts[0].model_path}"


@dataclass
class TracedMesh:
    """A running `expertmesh up` that exports spans to ``receiver``."""

    proc: subprocess.Popen[bytes]
    config: MeshConfig
    log_dir: Path
    receiver: OtlpReceiver

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.config.gateway.port}"

    def metrics(self, which: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics of the gateway or the expert: (sample name, sorted labels) -> value."""
        port = self.config.gateway.metrics_port if which == "gateway" else self.config.experts[0].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[TracedMesh]:
    receiver = OtlpReceiver().start()
    tmp = tmp_path_factory.mktemp("traced")
    path = write_config(
        tmp / "mesh.yaml",
        [
            demo_expert(
                EXPERT,
                "general",
                metrics_port=free_port(),
                engine_args={"otlp_traces_endpoint": receiver.endpoint},
            )
        ],
        gateway={"host": "127.0.0.1", "port": free_port(), "metrics_port": free_port()},
    )
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "EXPERTMESH_LOG_FORMAT": "json",
    }
    env.pop("OTEL_SERVICE_NAME", None)
    log_dir = tmp / "logs"
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(log_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        yield TracedMesh(proc, load_config(path), log_dir, receiver)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        receiver.stop()


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


async def test_one_trace_from_caller_through_gateway_expert_and_engine(mesh: TracedMesh) -> None:
    await wait_serving(mesh.gateway, timeout=300)
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        call = pb_grpc.GatewayStub(channel).Generate(
            pb.GenerateRequest(
                request_id="traced-1",
                prompt="Once upon a time",
                sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
            ),
            metadata=(("traceparent", traceparent),),
            timeout=60,
        )
        messages = [m async for m in call]
    assert sum(len(m.token_ids) for m in messages) == MAX_TOKENS

    names = {"gateway.generate", "gateway.attempt", expert_span(mesh), "llm_request"}
    spans = await asyncio.to_thread(
        mesh.receiver.wait_for,
        lambda got: names <= {s.name for s in got if s.trace_id == CALLER_TRACE},
        60,
    )
    trace = [s for s in spans if s.trace_id == CALLER_TRACE]
    request, attempt = _one(trace, "gateway.generate"), _one(trace, "gateway.attempt")
    expert, engine = _one(trace, expert_span(mesh)), _one(trace, "llm_request")

    assert request.service == attempt.service == "expertmesh-gateway"
    assert expert.service == f"expertmesh-expert-{EXPERT}"
    assert (request.parent_span_id, request.kind) == (CALLER_SPAN, "SERVER")
    assert (attempt.parent_span_id, attempt.kind) == (request.span_id, "CLIENT")
    assert (expert.parent_span_id, expert.kind) == (attempt.span_id, "SERVER")
    assert engine.parent_span_id == expert.span_id  # vLLM's own span, through trace_headers

    assert request.attributes["expertmesh.route.domain"] == "general"
    assert request.attributes["expertmesh.route.signal"] == "default"
    assert "expertmesh.route.confidence" in request.attributes
    assert request.attributes["expertmesh.request_id"] == "traced-1"
    assert request.attributes["rpc.grpc.status_code"] == 0
    assert attempt.attributes["expertmesh.expert_id"] == EXPERT
    assert attempt.attributes["expertmesh.replica"] == mesh.config.expert_address(0)
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["expertmesh.attempt.outcome"] == "ok"
    assert attempt.attributes["rpc.grpc.status_code"] == 0
    a = expert.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == mesh.config.experts[0].model_path
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.request.temperature"] == 0
    assert a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.response.id"] == "traced-1"
    assert 0 < a["expertmesh.ttft_ms"] < 60_000
    assert request.status_code == attempt.status_code == expert.status_code == "UNSET"

    # The engine load at start: its own trace, from the expert's service.
    load = _one([s for s in spans if s.service == expert.service], "expert.load")
    assert load.attributes["expertmesh.load.outcome"] == "ok"
    assert load.attributes["expertmesh.load.duration_s"] > 0
    # vLLM's own loading spans (this process and the engine processes it spawns) join the load's trace.
    loading = [s for s in spans if s.trace_id == load.trace_id and s is not load]
    assert any(s.parent_span_id == load.span_id for s in loading)
    assert "Load weights" in {s.name for s in loading}

    # JSON log lines of the gateway carry the request id and the caller's trace id.
    lines = [json.loads(x) for x in (mesh.log_dir / "gateway.log").read_text().splitlines() if x[:1] == "{"]
    mine = [x for x in lines if x.get("request_id") == "traced-1"]
    assert mine and all(x["trace_id"] == CALLER_TRACE for x in mine)


async def test_without_a_caller_traceparent_the_gateway_starts_the_trace(mesh: TracedMesh) -> None:
    async with MeshClient(mesh.gateway, timeout=60) as client:
        await client.complete("hello", request_id="untraced-1", max_tokens=2)

    def roots(got: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s
            for s in got
            if s.name == "gateway.generate" and s.attributes.get("expertmesh.request_id") == "untraced-1"
        ]

    spans = await asyncio.to_thread(mesh.receiver.wait_for, lambda got: bool(roots(got)), 30)
    (root,) = roots(spans)
    assert root.parent_span_id == ""
    expert = await asyncio.to_thread(
        mesh.receiver.wait_for,
        lambda got: any(s.trace_id == root.trace_id and s.name == expert_span(mesh) for s in got),
        30,
    )
    assert expert


async def test_a_cancelled_stream_ends_its_spans_as_cancelled(mesh: TracedMesh) -> None:
    async with MeshClient(mesh.gateway, timeout=60) as client:
        got = 0
        async for _ in client.stream(
            "Once upon a time", request_id="cancel-1", max_tokens=900, ignore_eos=True
        ):
            got += 1
            if got == 3:
                break  # leaving the iterator cancels the call

    def mine(got: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        return {s.name: s for s in got if s.attributes.get("expertmesh.request_id") == "cancel-1"}

    spans = await asyncio.to_thread(
        mesh.receiver.wait_for, lambda got: {"gateway.generate", expert_span(mesh)} <= set(mine(got)), 30
    )
    cancelled = grpc.StatusCode.CANCELLED.value[0]
    assert mine(spans)["gateway.generate"].attributes["rpc.grpc.status_code"] == cancelled
    assert mine(spans)[expert_span(mesh)].attributes["rpc.grpc.status_code"] == cancelled
    (attempt,) = [
        s
        for s in spans
        if s.name == "gateway.attempt" and s.parent_span_id == mine(spans)["gateway.generate"].span_id
    ]
    assert attempt.attributes["expertmesh.attempt.outcome"] == "cancelled"
    for log in ("gateway.log", f"{EXPERT}.log"):
        assert "Failed to detach context" not in (mesh.log_dir / log).read_text()


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_with_requests(mesh: TracedMesh) -> None:
    await wait_serving(mesh.gateway, timeout=300)
    gw, ex = mesh.metrics("gateway"), mesh.metrics("expert")
    async with MeshClient(mesh.gateway, timeout=60) as client:
        for _ in range(3):
            await client.complete("The weather today", max_tokens=5, ignore_eos=True)
        with pytest.raises(grpc.aio.AioRpcError):
            await client.complete("x", top_p=2.0)  # INVALID_ARGUMENT from the gateway, before routing
    deadline = time.monotonic() + 10  # the last stream's bookkeeping ends just after its reply
    while True:
        gw2, ex2 = mesh.metrics("gateway"), mesh.metrics("expert")
        if _value(ex2, "expertmesh_streams_in_flight", role="expert", expert=EXPERT) == 0:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)

    def delta(new: dict, old: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
        return _value(new, name, **labels) - _value(old, name, **labels)

    gw_ok = {"role": "gateway", "expert": EXPERT, "domain": "general"}
    assert delta(gw2, gw, "expertmesh_requests_total", **gw_ok, code="OK") == 3
    refused = {"role": "gateway", "expert": "", "domain": ""}  # refused before it was routed
    assert delta(gw2, gw, "expertmesh_requests_total", **refused, code="INVALID_ARGUMENT") == 1
    assert delta(gw2, gw, "expertmesh_routing_decisions_total", domain="general", signal="default") == 3
    ttft = "expertmesh_time_to_first_token_seconds_count"
    tpot = "expertmesh_time_per_output_token_seconds_count"
    assert delta(gw2, gw, ttft, role="gateway", expert=EXPERT) == 3
    ex_ok = {"role": "expert", "expert": EXPERT, "domain": "general"}
    assert delta(ex2, ex, "expertmesh_requests_total", **ex_ok, code="OK") == 3
    assert delta(ex2, ex, "expertmesh_requests_total", **ex_ok, code="INVALID_ARGUMENT") == 0  # never sent
    assert delta(ex2, ex, ttft, role="expert", expert=EXPERT) == 3
    assert delta(ex2, ex, tpot, role="expert", expert=EXPERT) == 3
    assert delta(ex2, ex, "expertmesh_generated_tokens_total", expert=EXPERT) == 15
    assert delta(ex2, ex, "expertmesh_time_to_first_token_seconds_sum", role="expert", expert=EXPERT) > 0
    assert _value(ex2, "expertmesh_expert_state", expert=EXPERT, state="READY") == 1
    assert _value(ex2, "expertmesh_queue_depth", expert=EXPERT) == 0
    assert _value(ex2, "expertmesh_model_load_seconds_count", expert=EXPERT, outcome="ok") == 1
    replica = {"expert": EXPERT, "replica": mesh.config.expert_address(0)}
    assert _value(gw2, "expertmesh_expert_health", **replica, status="SERVING") == 1
    assert _value(gw2, "expertmesh_replica_ejected", **replica) == 0
