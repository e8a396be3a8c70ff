"""One server runtime for the gateway and the experts (after uvicorn's server/supervisor split:
this is the server half; :mod:`expertmesh.supervisor` is the other).

A :class:`Runtime` starts telemetry, builds the gRPC server with the shared options
(:mod:`expertmesh.rpc`), binds, serves until its stop event (SIGTERM/SIGINT), then stops in one
order: background tasks cancelled -> the ``draining`` steps (health NOT_SERVING, new streams
refused) -> the server stops within the grace period -> the ``closing`` steps (links, engine) ->
telemetry exports its last spans. :func:`entry` is what both ``__main__`` modules share.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc

from . import loop
from .config import ConfigError
from .logs import setup_logging
from .rpc import bind, server_options, stop_event_on_signals
from .telemetry import Identity, Telemetry, start_telemetry

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None] | None]


class Refused(Exception):
    """Start-up refused (a bad argument, config or secret): ``error: ...``, exit code 2."""


class Runtime:
    """One serving process's gRPC server and everything that lives and stops with it."""

    def __init__(
        self,
        identity: Identity,
        metrics_port: int | None,
        host: str,
        max_message_bytes: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        stop: asyncio.Event | None = None,
    ) -> None:
        self.stop = stop or stop_event_on_signals()
        self.telemetry: Telemetry = start_telemetry(identity, metrics_port, host)
        self.server = grpc.aio.server(
            options=server_options(max_message_bytes), interceptors=list(interceptors)
        )
        self.draining: list[Step] = []  # before the server stops, in order
        self.closing: list[Step] = []  # after it stopped, in order
        self._tasks: list[asyncio.Task[Any]] = []

    def bind(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on host:port (0: any free port); the port bound."""
        return bind(self.server, host, port, credentials)

    def background(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``work`` while the server serves; cancelled first at stop."""
        task = asyncio.create_task(work)
        self._tasks.append(task)
        return task

    async def start(self) -> None:
        """Start serving."""
        await self.server.start()

    def abandon(self) -> None:
        """Give up before serving (e.g. the port is taken): telemetry stops, nothing else ran."""
        self.telemetry.stop()

    async def serve(self, grace_s: Callable[[], float]) -> None:
        """Serve until the stop event, then stop in order (module docstring); ``grace_s`` is read
        at stop time (an expert whose engine died gives less)."""
        try:
            await self.stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await _run(self.draining)
            await self.server.stop(grace_s())
            await _run(self.closing)
            self.telemetry.stop()  # export the last spans


async def _run(steps: Sequence[Step]) -> None:
    for step in steps:
        result = step()
        if result is not None:
            await result


def entry(start: Callable[[], Coroutine[Any, Any, int]], refusals: tuple[type[Exception], ...] = ()) -> int:
    """Run a serving process: logging, then ``start()`` (which reads the arguments and config and
    returns the server's coroutine) on the event loop. A refusal at start (:class:`Refused`, a
    :class:`ConfigError`, one of ``refusals``) prints ``error: ...`` and returns 2."""
    setup_logging()
    caught: tuple[type[Exception], ...] = (Refused, ConfigError, *refusals)
    try:
        code = loop.run(start())
    except caught as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loop.skip_exit_collection()
    return code
