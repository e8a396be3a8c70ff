"""Watch every expert's grpc.health.v1 with ``Watch`` (pushed, not polled) over one channel each."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.v1 import expertmesh_pb2 as pb

log = logging.getLogger(__name__)
EXPERT_SERVICE = pb.DESCRIPTOR.services_by_name["Expert"].full_name
RETRY_S = 0.5


class ExpertLink:
    """The gateway's connection to one expert address, and its last known health."""

    def __init__(self, expert_id: str, address: str) -> None:
        self.expert_id = expert_id
        self.address = address
        self.channel = grpc.aio.insecure_channel(address)
        self.health = "UNKNOWN"
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        """True while the expert's last health report was SERVING."""
        return self.health == "SERVING"

    def _set(self, status: str) -> None:
        if status != self.health:
            log.info("expert %s at %s: %s -> %s", self.expert_id, self.address, self.health, status)
            self.health = status
            self.changed.set()
            self.changed = asyncio.Event()

    async def _watch(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        while True:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=EXPERT_SERVICE), wait_for_ready=True)
                async for reply in call:
                    self._set(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as e:
                log.debug("health watch of %s ended: %s", self.expert_id, e.code().name)
            # The stream ended: the expert is gone or restarting.
            self._set("NOT_SERVING" if self.health != "UNKNOWN" else "UNKNOWN")
            await asyncio.sleep(RETRY_S)

    def start(self) -> None:
        """Begin watching in the background."""
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Stop watching and close the channel."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()
