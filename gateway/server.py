"""Run the gateway: one ExpertLink per expert, health SERVING while any expert is SERVING."""

from __future__ import annotations

import asyncio
import logging

import grpc

from expertmesh.config import MeshConfig
from expertmesh.rpc import Health, bind, stop_event_on_signals
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .health import ExpertLink
from .router import Router
from .servicer import GatewayServicer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Gateway"].full_name


async def _mirror_health(links: dict[str, ExpertLink], health: Health) -> None:
    """Keep the gateway's own health in step with its experts: SERVING if any can serve."""
    serving: bool | None = None
    while True:
        now = any(link.serving for link in links.values())
        if now != serving:
            serving = now
            await health.set(now)
        await asyncio.wait(
            [asyncio.create_task(link.changed.wait()) for link in links.values()],
            return_when=asyncio.FIRST_COMPLETED,
        )


async def serve(config: MeshConfig, port: int | None = None, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the process exit code."""
    stop = stop or stop_event_on_signals()
    links = {
        e.expert_id: ExpertLink(e.expert_id, config.expert_address(i)) for i, e in enumerate(config.experts)
    }
    server = grpc.aio.server()
    pb_grpc.add_GatewayServicer_to_server(GatewayServicer(Router(config), links), server)
    health = Health(server, [SERVICE])
    await health.set(False)
    bound = bind(server, config.gateway.host, config.gateway.port if port is None else port)
    await server.start()
    for link in links.values():
        link.start()
    mirror = asyncio.create_task(_mirror_health(links, health))
    log.info("gateway listening on %s:%d for %d experts", config.gateway.host, bound, len(links))
    try:
        await stop.wait()
    finally:
        mirror.cancel()
        await health.set(False)
        await server.stop(config.grace_period_s)
        for link in links.values():
            await link.close()
        log.info("gateway stopped")
    return 0
