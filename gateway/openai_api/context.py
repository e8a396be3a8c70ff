"""The HTTP request as the gateway's request path sees a gRPC call (:class:`CallContext`)."""

from __future__ import annotations

import math
import time

from starlette.requests import Request

from expertmesh.errors import InvalidRequest
from expertmesh.validation import MAX_TIME_LIMIT_S

#: The caller's deadline, in seconds from receipt (as ``grpc-timeout`` is for a gRPC call).
TIMEOUT_HEADER = "x-request-timeout"
#: Headers passed on as call metadata: the W3C trace context and the request id.
METADATA_HEADERS = ("traceparent", "tracestate", "x-request-id")


def parse_timeout(value: str | None) -> float | None:
    """The ``x-request-timeout`` header in seconds, or None; InvalidRequest when malformed."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIME_LIMIT_S:
        raise InvalidRequest(
            f"header {TIMEOUT_HEADER} must be seconds in (0, {MAX_TIME_LIMIT_S:g}], got {value[:32]!r}"
        )
    return seconds


class HttpCallContext:
    """Deadline, metadata and peer of one HTTP request; ``api`` labels its telemetry."""

    api = "openai"

    def __init__(self, request: Request) -> None:
        timeout = parse_timeout(request.headers.get(TIMEOUT_HEADER))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.metadata = tuple((k, request.headers[k]) for k in METADATA_HEADERS if k in request.headers)
        client = request.client
        if client is None:
            self._peer = "unknown"
        elif ":" in client.host:
            self._peer = f"ipv6:[{client.host}]:{client.port}"
        else:
            self._peer = f"ipv4:{client.host}:{client.port}"

    def time_remaining(self) -> float | None:
        """Seconds to the deadline (<= 0 once passed), None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """``traceparent``, ``tracestate``, ``x-request-id`` as the client sent them."""
        return self.metadata

    def peer(self) -> str:
        """The client's address in gRPC's form (what admission counts per host)."""
        return self._peer
