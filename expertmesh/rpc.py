"""What every expertmesh server and channel shares: options, health, reflection, binding,
the stop signals (the server's life around them is :mod:`expertmesh.runtime`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

#: Let the gateway ping often (see CHANNEL_OPTIONS), so that a hung peer is noticed in seconds
#: instead of at the next TCP timeout.
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]
#: The gateway's channels to experts: a ping every two seconds, 15 s to answer it (an expert busy
#: importing torch or loading weights on a saturated host answers late; a killed one resets at
#: once, and a hung one is ejected sooner by its failed requests).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 15000),
    # Recent gRPC cores time pings out by this setting (default one minute), not the one above.
    ("grpc.http2.ping_timeout_ms", 15000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

#: ``limits.max_message_bytes``'s default, for a channel opened without a config at hand.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: Ends the health Watch streams this long after shutdown set them NOT_SERVING: enough for that
#: last status to go out, so a server's stop never waits its whole grace period for watchers.
WATCH_FLUSH_S = 0.1


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Every expertmesh server's options: keepalive as above, message sizes set explicitly."""
    return [*SERVER_OPTIONS, *_size_options(max_message_bytes)]


def channel_options(max_message_bytes: int, keepalive: bool = True) -> list[tuple[str, Any]]:
    """A channel's options: message sizes set explicitly; the gateway's keepalive pings if asked."""
    return [*(CHANNEL_OPTIONS if keepalive else []), *_size_options(max_message_bytes)]


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive: bool = False,
) -> grpc.aio.Channel:
    """Every expertmesh channel: the shared options (:func:`channel_options`) and ``options``,
    over TLS when ``credentials`` are given."""
    every = [*channel_options(max_message_bytes, keepalive), *options]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=every)
    return grpc.aio.secure_channel(address, credentials, every)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's health servicer, whose Watch streams end once the server shuts down.

    grpc's own keeps them open forever, so a server's stop always waited its whole grace
    period for the gateway's (and any prober's) watchers.
    """

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Future[Any]] = set()
        self._closing = False

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self._closing:  # a watcher arriving during shutdown gets the status and the end
            await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        self._watches.add(watch)
        try:
            await asyncio.shield(watch)
        except asyncio.CancelledError:
            watch.cancel()
            if not self._closing or not watch.cancelled():
                raise
        finally:
            self._watches.discard(watch)

    async def close(self) -> None:
        """NOT_SERVING for every service, then end every Watch stream."""
        await self.enter_graceful_shutdown()
        self._closing = True
        await asyncio.sleep(WATCH_FLUSH_S)
        for watch in list(self._watches):
            watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._watches, return_exceptions=True)


class Health:
    """grpc.health.v1 for one server: the overall status ("") and each named service."""

    def __init__(self, server: grpc.aio.Server, services: list[str]) -> None:
        self.servicer = _HealthServicer()
        self.services = ["", *services]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for every service of this server."""
        for name in self.services:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def close(self) -> None:
        """Shutting down: NOT_SERVING from now on, and every Watch stream ends."""
        await self.servicer.close()


def enable_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """gRPC server reflection for ``services``, the health service and reflection itself."""
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*services, health_service, reflection.SERVICE_NAME], server)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so that ``main`` can stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Listen on host:port (port 0 = any free port), with TLS when ``credentials`` are given, and
    return the port actually bound."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(target)
    else:
        bound = server.add_secure_port(target, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {target}: address in use or not available")
    return bound
