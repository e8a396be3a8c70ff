"""The gateway's ``gateway.attempt`` span: one per expert replica tried for a request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from expertmesh.contract import EXPERT_SERVICE

from . import metrics
from .requests import RPC_ATTRIBUTES, code_of, current_request
from .tracing import inject_metadata, tracer


class Attempt:
    """One try at one expert: a CLIENT span, and the metadata that carries its context."""

    def __init__(self, span: Span, context: Context, expert_id: str) -> None:
        self.span = span
        self.context = context
        self.expert_id = expert_id
        self.code: grpc.StatusCode | None = None

    def metadata(
        self, base: tuple[tuple[str, str | bytes], ...] | list[tuple[str, str | bytes]] = ()
    ) -> tuple[tuple[str, str | bytes], ...]:
        """Outgoing gRPC metadata: ``base`` plus this attempt's trace context."""
        return inject_metadata(base, self.context)

    def set_outcome(self, code: grpc.StatusCode, details: str = "") -> None:
        """How the expert answered (call on failure; a block that ends normally means OK)."""
        self.code = code
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code == grpc.StatusCode.OK:
            span.set_attribute("expertmesh.attempt.outcome", "ok")
        else:
            span.set_attribute(
                "expertmesh.attempt.outcome", "cancelled" if code == grpc.StatusCode.CANCELLED else "error"
            )
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))


@contextmanager
def attempt_span(expert_id: str, address: str) -> Iterator[Attempt]:
    """A ``gateway.attempt`` span, child of the current ``gateway.generate``, for one expert tried.

    A try that follows a failed one counts as a failover (``expertmesh_failovers``) from the
    expert that failed to this one.
    """
    req = current_request()
    parent = req.context if req is not None else Context()
    host, _, port = address.rpartition(":")
    attributes: dict[str, Any] = {
        **RPC_ATTRIBUTES,
        "rpc.service": EXPERT_SERVICE,
        "expertmesh.expert_id": expert_id,
        "expertmesh.replica": address,
        "server.address": host or address,
    }
    if port.isdigit():
        attributes["server.port"] = int(port)
    if req is not None and req.failed_expert:
        attributes["expertmesh.failover_from"] = req.failed_expert
        metrics.record_failover(req.failed_expert, expert_id)
    span = tracer().start_span("gateway.attempt", context=parent, kind=SpanKind.CLIENT, attributes=attributes)
    attempt = Attempt(span, trace.set_span_in_context(span, parent), expert_id)
    if req is not None:
        req.attempts += 1
    in_flight = metrics.STREAMS_IN_FLIGHT.labels("gateway", expert_id)
    in_flight.inc()
    try:
        yield attempt
    except BaseException as exc:
        if attempt.code is None:
            code, details = code_of(exc, None)
            attempt.set_outcome(code, details)
        if isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
        raise
    finally:
        in_flight.dec()
        if attempt.code is None:
            attempt.set_outcome(grpc.StatusCode.OK)
        if req is not None and attempt.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            req.failed_expert = expert_id
        if req is not None:
            req.last_attempt = expert_id
        span.end()
