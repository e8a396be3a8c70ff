"""The one table that maps causes to gRPC status codes, and the decorator that applies it.

Every servicer method (unary or server-streaming) is wrapped with :func:`grpc_errors`, so a
known cause always reaches the caller as a precise code with a message that names it, and
the process keeps serving. INTERNAL is reserved for the truly unexpected, and even then the
message carries the exception's type and text.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


#: Trailing metadata: why a request was refused, when the gateway should act on it.
REASON_KEY = "expertmesh-reason"
#: gRPC's retry pushback (A6): how long a client should wait before it retries.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: REASON_KEY of a refusal that is this expert's, not the request's: another expert may serve it.
EXPERT_LIMIT = "expert-limit"
OVERLOADED = "overloaded"
PUSHBACK_MS = 1000


class MeshError(Exception):
    """Base of expertmesh's own errors; ``code`` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL
    #: sent as trailing metadata with the status (see :func:`trailers_for`)
    trailers: tuple[tuple[str, str], ...] = ()


class InvalidRequest(MeshError):
    """A request field is missing, malformed or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ExpertLimit(InvalidRequest):
    """The request is valid, but this expert cannot serve it (context too small, chat template)."""

    trailers = ((REASON_KEY, EXPERT_LIMIT),)


class DeadlineExceeded(MeshError):
    """The caller's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(MeshError):
    """A named expert or domain does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(MeshError):
    """The engine is loading, dead or shutting down; a caller may retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(MeshError):
    """A queue or memory limit was hit; the caller is told when to retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = ((REASON_KEY, OVERLOADED), (PUSHBACK_KEY, str(PUSHBACK_MS)))


class RateLimited(ResourceExhausted):
    """A tenant's limit was hit; the caller may retry after ``retry_after_s`` (gRPC retry pushback)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        # grpc-retry-pushback-ms: what gRPC clients with a retry policy wait for
        self.trailers = ((REASON_KEY, OVERLOADED), (PUSHBACK_KEY, str(max(int(retry_after_s * 1000), 1))))


class PermissionDenied(MeshError):
    """An authenticated caller asked for something its tenant may not use."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(MeshError):
    """No credentials, or unknown ones (the HTTP front; the gRPC interceptor aborts itself)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(MeshError):
    """The expert is not in a state that allows the operation (e.g. unloading while busy)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(MeshError):
    """The request asks for a feature this expert does not support."""

    code = grpc.StatusCode.UNIMPLEMENTED


# Causes raised by libraries, by fully qualified class name so that the gateway can share
# this table without importing vLLM. Matched against the exception's MRO, first hit wins.
_BY_CLASS_NAME: dict[str, grpc.StatusCode] = {
    "vllm.exceptions.VLLMValidationError": grpc.StatusCode.INVALID_ARGUMENT,
    "vllm.exceptions.VLLMNotFoundError": grpc.StatusCode.NOT_FOUND,
    "vllm.exceptions.VLLMClientError": grpc.StatusCode.INVALID_ARGUMENT,
    "vllm.v1.engine.exceptions.EngineDeadError": grpc.StatusCode.UNAVAILABLE,
    "vllm.v1.engine.exceptions.EngineGenerateError": grpc.StatusCode.UNAVAILABLE,
    # Admission control (ExpertConfig.max_queue -> max_num_queued_reqs): the queue is full.
    "vllm.exceptions.QueueOverflowError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "vllm.exceptions.MaxQueuedTokensError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "vllm.exceptions.RetryableRequestError": grpc.StatusCode.UNAVAILABLE,
    "torch.OutOfMemoryError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "builtins.TimeoutError": grpc.StatusCode.DEADLINE_EXCEEDED,
    "builtins.MemoryError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "builtins.NotImplementedError": grpc.StatusCode.UNIMPLEMENTED,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for ``exc``."""
    if isinstance(exc, MeshError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # An upstream call failed: pass its code and message through unchanged.
        return exc.code(), exc.details() or exc.code().name
    for cls in type(exc).__mro__:
        code = _BY_CLASS_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            cause = exc.__cause__
            text = str(exc) or (f"{type(cause).__name__}: {cause}" if cause else type(exc).__name__)
            return code, text
    return grpc.StatusCode.INTERNAL, f"unexpected {type(exc).__name__}: {exc}"


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that goes with ``exc``'s status (a full queue: retry pushback)."""
    if isinstance(exc, MeshError):
        return exc.trailers
    code, _ = status_for(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted.trailers
    return ()


#: The OpenAI-compatible HTTP front's answer for each gRPC status: HTTP status and OpenAI error
#: ``type``. One table, so a cause keeps its meaning on both fronts; a code not here is a 500.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    """HTTP status and OpenAI error type for a gRPC status (:data:`HTTP_STATUS`)."""
    return HTTP_STATUS.get(code, (500, "server_error"))


def retry_after_s(exc: BaseException) -> float | None:
    """The retry pushback that goes with ``exc`` (seconds), or None."""
    trailers: tuple[tuple[str, Any], ...] = trailers_for(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        trailers = tuple(exc.trailing_metadata() or ()) + trailers
    for key, value in trailers:
        if key == PUSHBACK_KEY:
            try:
                return int(value) / 1000.0
            except ValueError:
                return None
    return None


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(handler: F) -> F:
    """Wrap a grpc.aio handler (coroutine or async generator) so errors become statuses."""

    async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", handler.__qualname__)
        trailers = trailers_for(exc)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await fail(context, exc)

        return stream  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await fail(context, exc)

    return unary  # type: ignore[return-value]
