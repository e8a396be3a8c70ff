"""The health watch of one replica: ``grpc.health.v1.Health/Watch`` (pushed, not polled) on the
two services an expert publishes, fed into its :class:`~.replica.Replica` state.

``expertmesh.v1.Expert``: can it take a request? ``expertmesh.v1.Expert/engine``: is its engine
loaded? Channel keepalive pings (``CHANNEL_OPTIONS``) end the watch within about two seconds when
the process dies or hangs, so a dead replica leaves rotation at once.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.contract import ENGINE_SERVICE

from .replica import Replica

log = logging.getLogger(__name__)
RETRY_S = 0.5


async def watch(channel: grpc.aio.Channel, replica: Replica, service: str) -> None:
    """Follow ``service``'s health on ``channel`` into ``replica``, reconnecting forever."""
    stub = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    while True:
        try:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
            async for reply in call:
                if service == ENGINE_SERVICE:
                    replica.set_engine(reply.status == serving)
                else:
                    replica.set_health(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.aio.AioRpcError as e:
            log.debug("health watch of %s (%s) ended: %s", replica.expert_id, service, e.code().name)
        # The stream ended: the replica died, hung (keepalive) or is restarting.
        if service == ENGINE_SERVICE:
            replica.set_engine(False)
        else:
            replica.set_health("NOT_SERVING" if replica.health != "UNKNOWN" else "UNKNOWN")
        await asyncio.sleep(RETRY_S)
