"""The gateway's view of one expert replica: its channel, the multiplexed call its requests
share (:mod:`expertmesh.mux`), pushed health, load and ejection state (:mod:`.ejection`).

Health arrives by ``grpc.health.v1.Health/Watch`` (pushed, not polled) on two services of the
expert: ``expertmesh.v1.Expert`` (can it take a request?) and ``expertmesh.v1.Expert/engine``
(is its engine loaded?). Channel keepalive pings (``CHANNEL_OPTIONS``) end the watch within about
two seconds when the process dies or hangs, so a dead replica leaves rotation at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.config import LimitsConfig
from expertmesh.mux import Multiplexer
from expertmesh.rpc import channel_options
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .ejection import Ejection

log = logging.getLogger(__name__)
EXPERT_SERVICE = pb.DESCRIPTOR.services_by_name["Expert"].full_name
ENGINE_SERVICE = EXPERT_SERVICE + "/engine"
RETRY_S = 0.5


class ExpertLink:
    """One replica address of one expert."""

    def __init__(
        self,
        expert_id: str,
        address: str,
        ejection: Ejection | None = None,
        limits: LimitsConfig | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, str]] | None = None,
    ) -> None:
        self.expert_id = expert_id
        self.address = address
        #: the DNS name this address was found under (its certificate's name), if it was
        self.server_name: str | None = None
        limits = limits or LimitsConfig()
        shared = channel_options(limits.max_message_bytes)
        # With internal_tls: the mesh CA, the gateway's client certificate (expertmesh.tls.link_security).
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=shared)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, [*shared, *(options or [])])
        self.stub = pb_grpc.ExpertStub(self.channel)  # built once: a stub makes one callable per RPC
        self.mux = Multiplexer(self.stub, limits)  # every Generate to this replica, over one call
        self.health = "UNKNOWN"
        self.engine_ready = False
        self.outstanding = 0
        self.ejection = ejection or Ejection()
        self.changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def serving(self) -> bool:
        """True while the replica's last health report was SERVING."""
        return self.health == "SERVING"

    def available(self) -> bool:
        """Serving (or not yet known) and not ejected."""
        return self.health in ("SERVING", "UNKNOWN") and not self.ejection.ejected()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _set(self, status: str) -> None:
        if status != self.health:
            log.info("expert %s at %s: %s -> %s", self.expert_id, self.address, self.health, status)
            if status == "SERVING" and self.ejection.ejected():
                self.ejection.health_passed()
            self.health = status
            self._notify()

    def _set_engine(self, ready: bool) -> None:
        if ready != self.engine_ready:
            self.engine_ready = ready
            self._notify()

    async def _watch(self, service: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        while True:
            try:
                call = stub.Watch(health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
                async for reply in call:
                    if service == ENGINE_SERVICE:
                        self._set_engine(reply.status == serving)
                    else:
                        self._set(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as e:
                log.debug("health watch of %s (%s) ended: %s", self.expert_id, service, e.code().name)
            # The stream ended: the replica died, hung (keepalive) or is restarting.
            if service == ENGINE_SERVICE:
                self._set_engine(False)
            else:
                self._set("NOT_SERVING" if self.health != "UNKNOWN" else "UNKNOWN")
            await asyncio.sleep(RETRY_S)

    def start(self) -> None:
        """Begin watching in the background."""
        self._tasks = [asyncio.create_task(self._watch(s)) for s in (EXPERT_SERVICE, ENGINE_SERVICE)]

    def status(self) -> pb.ReplicaStatus:
        """This replica for ListExperts."""
        left = max(self.ejection.until - time.monotonic(), 0.0)
        return pb.ReplicaStatus(
            address=self.address,
            health=self.health,
            engine_ready=self.engine_ready,
            outstanding=self.outstanding,
            consecutive_failures=self.ejection.consecutive_failures,
            ejections=self.ejection.ejections,
            ejected_for_s=round(left, 3),
        )

    async def close(self) -> None:
        """Stop watching, end the multiplexed call and close the channel."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.mux.close()
        await self.channel.close()
