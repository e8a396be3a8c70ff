"""Run a check before a gRPC handler, whatever its kind: the shared part of the server
interceptors that authenticate callers (gateway tokens, expert peer certificates).

The check runs inside the handler's own task with the call's context, so it can abort with a
precise status and set context variables the servicer then reads (the caller's tenant).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

#: ``await check(context)``: returns to let the call through, raises (``context.abort``) to refuse.
Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _guarded(behavior: Callable[..., Any], check: Check) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return unary


def guard(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """``handler`` with ``check`` run before its behavior (any of the four RPC kinds)."""
    if handler.unary_unary:
        kind, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.unary_stream:
        kind, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif handler.stream_unary:
        kind, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        kind, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return kind(  # type: ignore[no-any-return]
        _guarded(behavior, check),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
