"""Run one expert: bind the port first (health NOT_SERVING), load the engine, then SERVING.

Shutdown order on SIGTERM/SIGINT: health NOT_SERVING -> stop accepting and let in-flight
streams finish within the grace period -> shut the engine (and its processes) down.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from expertmesh.config import ExpertConfig
from expertmesh.rpc import SERVER_OPTIONS, Health, bind, stop_event_on_signals
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .engine import EngineHost, engine_host
from .servicer import ExpertServicer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Expert"].full_name
WATCHDOG_INTERVAL_S = 1.0


async def _watchdog(host: EngineHost, health: Health, stop: asyncio.Event) -> None:
    """Turn health NOT_SERVING and stop the process when the engine dies."""
    while not stop.is_set():
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        if host.engine_died():
            log.error("expert %s: %s; stopping", host.cfg.expert_id, host.last_error)
            await health.set(False)
            stop.set()


async def serve(cfg: ExpertConfig, port: int, grace_s: float) -> int:
    """Serve until a signal or engine death; return the process exit code."""
    stop = stop_event_on_signals()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    async with engine_host(cfg) as host:
        pb_grpc.add_ExpertServicer_to_server(ExpertServicer(host), server)
        health = Health(server, [SERVICE])
        await health.set(False)
        bound = bind(server, cfg.host, port)
        await server.start()
        log.info("expert %s listening on %s:%d (NOT_SERVING until loaded)", cfg.expert_id, cfg.host, bound)
        exit_code = 0
        try:
            load = asyncio.create_task(host.load())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if load.done() and load.exception() is None:
                await health.set(True)
                log.info("expert %s SERVING", cfg.expert_id)
                watchdog = asyncio.create_task(_watchdog(host, health, stop))
                await stop.wait()
                watchdog.cancel()
                exit_code = 1 if host.state == pb.EXPERT_STATE_FAILED else 0
            elif load.done():
                # Keep the real cause visible to Info callers until told to stop.
                exit_code = 1
                await stop.wait()
            else:
                load.cancel()
        finally:
            await health.set(False)
            await server.stop(grace_s)
            log.info("expert %s stopped", cfg.expert_id)
    return exit_code
