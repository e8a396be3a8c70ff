"""Per-request telemetry: one span, the log context and the metrics of one Generate stream.

The servicers use three decorators and two small helpers:

- ``@gateway_generate`` / ``@expert_generate`` under ``@grpc_errors`` on ``Generate``: a SERVER
  span (``gateway.generate`` / the expert's, named as OpenTelemetry's GenAI conventions name an
  inference span: ``text_completion MODEL`` or ``chat MODEL``, with ``gen_ai.*`` attributes)
  that is a child of the caller's trace context
  in the gRPC metadata; ``request_id``/``trace_id`` on every log line of the request; TTFT, time
  per output token, tokens, status code and streams in flight recorded from the stream itself.
- :func:`current_request` ``.set_route(domain, signal, confidence)`` once the gateway has routed.
- ``with attempt_span(expert_id, address) as attempt:`` around each try at an expert, with
  ``metadata=attempt.metadata(...)`` on the outgoing call (a CLIENT span ``gateway.attempt``
  whose context the expert continues) and ``attempt.set_outcome(code, details)`` on failure.
- :func:`trace_headers` for vLLM's ``AsyncLLM.generate(..., trace_headers=...)``.
- ``@traced_load`` on the engine host's ``load``: span ``expert.load`` and the load-time metric.

Spans are started with explicit parents and never made "current": an async generator that
grpc abandons is finalised in another context, where detaching a context would fail.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from expertmesh.contract import EXPERT_SERVICE, GATEWAY_SERVICE
from expertmesh.errors import status_for
from expertmesh.logs import request_context
from expertmesh.v1 import expertmesh_pb2 as pb

from . import metrics
from .tracing import context_from_metadata, tracer, vllm_trace_headers

#: Server-span status is ERROR only for these codes (OpenTelemetry gRPC conventions); the
#: others are the caller's doing and leave the status unset, with the code as an attribute.
SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True)
class Identity:
    """Who this process is: set once at start by :func:`expertmesh.telemetry.start_telemetry`."""

    role: str = "gateway"
    expert_id: str = ""
    domain: str = ""
    model: str = ""


_identity = Identity()
_current: ContextVar[RequestTelemetry | None] = ContextVar("expertmesh_request", default=None)


def set_identity(identity: Identity) -> None:
    """Name the process's role (and expert) for spans and metric labels."""
    global _identity
    _identity = identity


def identity() -> Identity:
    """The process identity."""
    return _identity


def current_request() -> RequestTelemetry | None:
    """The telemetry of the Generate request being served in this task, if any."""
    return _current.get()


def note_route(domain: str, signal: str, confidence: float | None = None) -> None:
    """Record a routing decision: the metric, and the attributes of the current request span."""
    req = _current.get()
    if req is not None:
        req.set_route(domain, signal, confidence)
    else:
        metrics.record_route(domain, signal)


def code_of(exc: BaseException | None, context: Any) -> tuple[grpc.StatusCode, str]:
    """The status the caller sees when the stream ended with ``exc``."""
    if exc is None:
        return grpc.StatusCode.OK, ""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = _call(context, "time_remaining")
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return grpc.StatusCode.CANCELLED, "cancelled by the caller"
    if isinstance(exc, grpc.aio.AbortError):
        code = _call(context, "code")
        return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), str(
            _call(context, "details") or "aborted"
        )
    if not isinstance(exc, Exception):
        return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}"
    return status_for(exc)


def _call(obj: Any, method: str) -> Any:
    """``obj.method()`` where a fake (or older) context may lack it."""
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else None
    except Exception:
        return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass
class RequestTelemetry:
    """The span, timing and labels of one Generate stream (gateway or expert)."""

    role: str
    span: Span
    context: Context
    request_id: str
    domain: str = ""
    expert: str = ""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    response_id: str = ""
    attempts: int = 0
    last_attempt: str = ""
    failed_expert: str = ""
    api: str = "grpc"  # the gateway front the request came by: "grpc" or "openai"

    @property
    def trace_id(self) -> str | None:
        """The trace id (also valid when tracing is off but the caller sent a traceparent)."""
        ctx = self.span.get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid else None

    def set_route(self, domain: str, signal: str, confidence: float | None = None) -> None:
        """Record the gateway's routing decision on the span and in ``expertmesh_routing_decisions``."""
        self.domain = domain
        metrics.record_route(domain, signal)
        if self.span.is_recording():
            self.span.set_attribute("expertmesh.route.domain", domain)
            self.span.set_attribute("expertmesh.route.signal", signal)
            if confidence is not None:
                self.span.set_attribute("expertmesh.route.confidence", float(confidence))

    def observe(self, msg: pb.GenerateResponse) -> None:
        """Account one streamed message: first-token time, tokens, the final usage."""
        now = time.monotonic()
        if msg.expert_id and not self.expert:
            self.expert = msg.expert_id
        if msg.request_id and not self.response_id:
            self.response_id = msg.request_id
        if msg.token_ids or msg.text:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.TTFT.labels(self.role, self.expert).observe(now - self.started)
            self.last_token_at = now
            self.tokens += len(msg.token_ids)
        if msg.finish_reason:
            self.finish_reason = msg.finish_reason
        if msg.HasField("usage"):
            self.prompt_tokens = msg.usage.prompt_tokens
            self.completion_tokens = msg.usage.completion_tokens

    def finish(self, exc: BaseException | None, context: Any) -> None:
        """End the span and record the request's metrics."""
        code, details = code_of(exc, context)
        end = time.monotonic()
        self.expert = self.expert or self.last_attempt
        completion = self.completion_tokens or self.tokens
        labels = (self.role, self.expert)
        metrics.REQUESTS.labels(self.role, self.expert, self.domain, code.name).inc()
        if self.role == "gateway":
            metrics.API_REQUESTS.labels(self.api, code.name).inc()
        metrics.REQUEST_DURATION.labels(*labels).observe(end - self.started)
        first, last = self.first_token_at, self.last_token_at
        if first is not None and last is not None and completion > 1:
            metrics.TPOT.labels(*labels).observe((last - first) / (completion - 1))
        if self.role == "expert":
            metrics.STREAMS_IN_FLIGHT.labels(*labels).dec()
            metrics.GENERATED_TOKENS.labels(self.expert).inc(completion)
            metrics.PROMPT_TOKENS.labels(self.expert).inc(self.prompt_tokens)
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if self.expert:
            span.set_attribute("expertmesh.expert_id", self.expert)
        if first is not None:
            span.set_attribute("expertmesh.ttft_ms", _ms(first - self.started))
        if self.role == "gateway":
            span.set_attribute("expertmesh.attempts", self.attempts)
        if self.response_id:
            span.set_attribute("gen_ai.response.id", self.response_id)
        span.set_attribute("gen_ai.usage.output_tokens", completion)
        if self.prompt_tokens:
            span.set_attribute("gen_ai.usage.input_tokens", self.prompt_tokens)
        if self.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        if exc is not None and isinstance(exc, Exception):
            span.record_exception(exc)
        if code in SERVER_ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        elif code != grpc.StatusCode.OK:
            span.set_attribute("expertmesh.error", f"{code.name}: {details}")
        span.end()


RPC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.method": "Generate"}


def _start(role: str, request: pb.GenerateRequest, context: Any) -> RequestTelemetry:
    parent = context_from_metadata(_call(context, "invocation_metadata"))
    me = _identity
    if role == "gateway":
        attributes: dict[str, Any] = {**RPC_ATTRIBUTES, "rpc.service": GATEWAY_SERVICE}
        name = "gateway.generate"
    else:
        generation = _generation_attributes(request, me)
        attributes = {**RPC_ATTRIBUTES, "rpc.service": EXPERT_SERVICE, **generation}
        # OpenTelemetry's GenAI conventions: "{gen_ai.operation.name} {gen_ai.request.model}"
        name = f"{generation['gen_ai.operation.name']} {me.model}"
    if request.request_id:
        attributes["expertmesh.request_id"] = request.request_id
    span = tracer().start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    req = RequestTelemetry(role, span, trace.set_span_in_context(span, parent), request.request_id)
    if role == "gateway":
        req.api = str(getattr(context, "api", "grpc"))
        if span.is_recording():
            span.set_attribute("expertmesh.api", req.api)
    if role == "expert":
        req.expert, req.domain = me.expert_id, me.domain
        metrics.STREAMS_IN_FLIGHT.labels(role, req.expert).inc()
    return req


def _generation_attributes(request: pb.GenerateRequest, me: Identity) -> dict[str, Any]:
    s = request.sampling
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.messages else "text_completion",
        "gen_ai.request.model": me.model,
        "expertmesh.expert_id": me.expert_id,
    }
    for attr, name in (
        ("gen_ai.request.max_tokens", "max_tokens"),
        ("gen_ai.request.temperature", "temperature"),
        ("gen_ai.request.top_p", "top_p"),
        ("gen_ai.request.top_k", "top_k"),
        ("gen_ai.request.seed", "seed"),
    ):
        if s.HasField(name):  # type: ignore[arg-type]
            attributes[attr] = getattr(s, name)
    if s.stop:
        attributes["gen_ai.request.stop_sequences"] = list(s.stop)
    return attributes


async def _traced(
    req: RequestTelemetry, stream: AsyncIterator[pb.GenerateResponse], context: Any
) -> AsyncIterator[pb.GenerateResponse]:
    token = _current.set(req)
    try:
        with request_context(req.request_id, req.trace_id):
            try:
                async with aclosing(stream):  # type: ignore[type-var]
                    async for msg in stream:
                        req.observe(msg)
                        yield msg
            except BaseException as exc:
                req.finish(exc, context)
                raise
            req.finish(None, context)
    finally:
        with suppress(ValueError):  # finalised in another context; the request's died with its task
            _current.reset(token)


H = TypeVar("H", bound=Callable[..., Any])


def _decorator(role: str) -> Callable[[H], H]:
    def decorate(handler: H) -> H:
        @functools.wraps(handler)
        async def generate(self: Any, request: pb.GenerateRequest, context: Any) -> AsyncIterator[Any]:
            req = _start(role, request, context)
            async for msg in _traced(req, handler(self, request, context), context):
                yield msg

        return generate  # type: ignore[return-value]

    return decorate


#: Decorate the gateway's ``Generate`` (below ``@grpc_errors``).
gateway_generate = _decorator("gateway")
#: Decorate the expert's ``Generate`` (below ``@grpc_errors``).
expert_generate = _decorator("expert")


def trace_headers(engine: Any) -> dict[str, str] | None:
    """vLLM ``trace_headers`` continuing the current expert span (None: don't pass)."""
    req = _current.get()
    return vllm_trace_headers(engine, req.context) if req is not None else None
