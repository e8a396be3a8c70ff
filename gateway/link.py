"""The gateway's link to one expert replica: its channel, the multiplexed call its requests
share (:mod:`expertmesh.mux`) and its health watch (:mod:`.watch`). The replica's state is the
:class:`~.replica.Replica` it extends."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from expertmesh.config import LimitsConfig
from expertmesh.contract import ENGINE_SERVICE, EXPERT_SERVICE
from expertmesh.mux import Multiplexer
from expertmesh.rpc import open_channel
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .ejection import Ejection
from .replica import Replica
from .watch import watch


class ExpertLink(Replica):
    """One replica address of one expert, and the connection to it."""

    def __init__(
        self,
        expert_id: str,
        address: str,
        ejection: Ejection | None = None,
        limits: LimitsConfig | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(expert_id, address, ejection)
        #: the DNS name this address was found under (its certificate's name), if it was
        self.server_name: str | None = None
        limits = limits or LimitsConfig()
        # With internal_tls: the mesh CA, the gateway's client certificate (expertmesh.tls.link_security).
        extra = options or [] if credentials is not None else []
        self.channel = open_channel(address, credentials, extra, limits.max_message_bytes, keepalive=True)
        self.stub = pb_grpc.ExpertStub(self.channel)  # built once: a stub makes one callable per RPC
        self.mux = Multiplexer(self.stub, limits)  # every Generate to this replica, over one call
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Begin watching in the background."""
        self._tasks = [
            asyncio.create_task(watch(self.channel, self, s)) for s in (EXPERT_SERVICE, ENGINE_SERVICE)
        ]

    async def close(self) -> None:
        """Stop watching, end the multiplexed call and close the channel."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.mux.close()
        await self.channel.close()
