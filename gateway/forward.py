"""Forward one request to the experts of its route, failing over before the first token.

A candidate is tried when its health is SERVING (or still unknown). An attempt that fails
with UNAVAILABLE, RESOURCE_EXHAUSTED or a connect failure *before any message reached the
caller* moves on to the next candidate; INVALID_ARGUMENT and other caller errors are never
retried. Once a message has been streamed, a failure ends the stream with UNAVAILABLE naming
the expert and the cause, because replaying would duplicate text the caller already has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from expertmesh.errors import MeshError, Unavailable
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .health import ExpertLink

#: Codes that mean "this expert cannot take it now, another one may".
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Taken off the caller's deadline so the expert times out first and the gateway can report it.
DEADLINE_MARGIN_S = 0.05


@dataclass
class Attempt:
    """One try at one expert, for the final error message and the route explanation."""

    expert_id: str
    outcome: str  # "ok", "skipped: ...", or "CODE: details"


@dataclass
class Forwarding:
    """The attempts made for one request, in order."""

    attempts: list[Attempt] = field(default_factory=list)

    def summary(self) -> str:
        """``a: UNAVAILABLE: ...; b: skipped: NOT_SERVING``."""
        return "; ".join(f"{a.expert_id}: {a.outcome}" for a in self.attempts)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining - DEADLINE_MARGIN_S, 0.001)


async def forward(
    request: pb.GenerateRequest,
    candidates: Sequence[ExpertLink],
    context: grpc.aio.ServicerContext,
    forwarding: Forwarding,
) -> AsyncIterator[pb.GenerateResponse]:
    """Stream the answer of the first candidate that takes the request."""
    for link in candidates:
        if link.health not in ("SERVING", "UNKNOWN"):
            forwarding.attempts.append(Attempt(link.expert_id, f"skipped: health {link.health}"))
            continue
        stub = pb_grpc.ExpertStub(link.channel)
        call = stub.Generate(request, timeout=_timeout(context), metadata=_passthrough(context))
        sent = 0
        try:
            async for msg in call:
                sent += 1
                yield msg
            forwarding.attempts.append(Attempt(link.expert_id, "ok"))
            return
        except grpc.aio.AioRpcError as e:
            outcome = f"{e.code().name}: {e.details()}"
            forwarding.attempts.append(Attempt(link.expert_id, outcome))
            if sent:
                raise Unavailable(
                    f"expert {link.expert_id} failed mid-stream after {sent} messages: {outcome}"
                ) from None
            if e.code() not in RETRYABLE:
                raise
        finally:
            call.cancel()  # no-op when finished; aborts the expert's request when we were cancelled
    raise _all_failed(forwarding)


def _passthrough(context: grpc.aio.ServicerContext) -> Sequence[tuple[str, str | bytes]]:
    """Caller metadata worth forwarding (trace context, request ids)."""
    keep = ("traceparent", "tracestate", "x-request-id")
    return tuple((k, v) for k, v in context.invocation_metadata() or () if k in keep)


def _all_failed(forwarding: Forwarding) -> MeshError:
    if not forwarding.attempts:
        return Unavailable("no expert to try")
    return Unavailable(f"every expert for this request failed: {forwarding.summary()}")
