"""What the gateway's request path uses of the caller's call, whichever front it came by."""

from __future__ import annotations

from typing import Any, Protocol


class CallContext(Protocol):
    """A grpc.aio.ServicerContext, or the HTTP front's stand-in
    (:class:`expertmesh.gateway.openai.context.HttpCallContext`)."""

    def time_remaining(self) -> float | None:
        """Seconds to the caller's deadline; None without one."""

    def invocation_metadata(self) -> Any:
        """The caller's metadata as (key, value) pairs (traceparent, x-request-id, ...)."""

    def peer(self) -> str:
        """``ipv4:host:port`` of the caller."""
