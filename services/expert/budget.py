"""The mesh memory budget: an on-demand load first unloads the least recently used idle expert.

Every expert of the config runs on this host under ``expertmesh up``, so before a lazy load (or
a reload) the expert asks its peers for their ``Info`` (memory, state, idle time) and, while
the experts' resident memory plus what this load adds would exceed ``memory_budget_gib``,
calls ``Unload`` on the peer that has been idle longest. If no idle peer is left, the load is
refused with RESOURCE_EXHAUSTED and the expert stays COLD. The figures are measured resident
memory (process trees), so the check is approximate; two loads at the same moment may both pass.
Under ``internal_tls`` the peers are called over mTLS with this expert's own mesh certificate
(``Unload`` answers only a mesh certificate), re-read at each check so that rotation is followed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from expertmesh.config import MeshConfig
from expertmesh.errors import ResourceExhausted
from expertmesh.rpc import open_channel
from expertmesh.tls import TlsError, link_security
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .lifecycle import Lifecycle
from .memory import GIB, estimate_load_bytes
from .proctree import tree_rss

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 2.0
UNLOAD_TIMEOUT_S = 120.0
#: Channel credentials towards the peers (None: plaintext) and the options they need.
Security = tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]


def _plaintext() -> Security:
    return None, []


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


class MemoryBudget:
    """Makes room for one expert's loads among the other experts of its mesh config."""

    def __init__(
        self,
        limit_gib: float,
        expert_id: str,
        peers: dict[str, str],
        security: Callable[[], Security] = _plaintext,
    ) -> None:
        self.limit = int(limit_gib * GIB)
        self.expert_id = expert_id
        self.peers = peers  # expert_id -> address
        self._read_security = security
        self._security = security()  # TlsError at start, as for the server's own certificates

    @classmethod
    def for_mesh(cls, mesh: MeshConfig | None, expert_id: str) -> MemoryBudget | None:
        """The budget of ``mesh`` for ``expert_id``, or None when the mesh sets none."""
        if mesh is None or mesh.memory_budget_gib is None:
            return None
        peers = {e.expert_id: mesh.expert_address(i) for i, e in enumerate(mesh.experts)}
        peers.pop(expert_id)
        pair = mesh.expert_cert(expert_id)
        return cls(mesh.memory_budget_gib, expert_id, peers, lambda: link_security(mesh, pair))

    def _refresh_security(self) -> None:
        try:
            self._security = self._read_security()
        except TlsError as e:
            log.error("peer certificate reload rejected, keeping the certificates in use: %s", e)

    def _channel(self, address: str) -> grpc.aio.Channel:
        credentials, options = self._security
        return open_channel(address, credentials, options)

    async def _info(self, peer: str) -> pb.InfoResponse | None:
        async with self._channel(self.peers[peer]) as channel:
            try:
                return await pb_grpc.ExpertStub(channel).Info(pb.InfoRequest(), timeout=INFO_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                # not running: it holds no memory we could free
                log.info("expert %s did not answer Info (%s): counted as holding none", peer, e.code().name)
                return None

    async def _unload(self, address: str, reason: str) -> pb.InfoResponse:
        async with self._channel(address) as channel:
            stub = pb_grpc.ExpertStub(channel)
            return await stub.Unload(pb.UnloadRequest(reason=reason), timeout=UNLOAD_TIMEOUT_S)

    async def make_room(self, life: Lifecycle) -> None:
        """Unload idle peers, least recently used first, until this load fits; else ResourceExhausted."""
        need = life.load_growth_bytes or estimate_load_bytes(life.cfg)
        self._refresh_security()
        ids = list(self.peers)
        replies = await asyncio.gather(*(self._info(i) for i in ids))
        infos = {i: info for i, info in zip(ids, replies, strict=True) if info is not None}
        used = tree_rss() + sum(info.memory_bytes for info in infos.values())
        tried: set[str] = set()
        while used + need > self.limit:
            idle = [
                (info.idle_seconds, peer)
                for peer, info in infos.items()
                if info.state == pb.EXPERT_STATE_READY and not info.requests_in_flight and peer not in tried
            ]
            if not idle:
                raise ResourceExhausted(
                    f"memory budget {_gib(self.limit)}: experts use {_gib(used)} and loading "
                    f"{self.expert_id} needs about {_gib(need)}, and no idle expert is left to unload"
                )
            _, victim = max(idle)
            tried.add(victim)
            reason = (
                f"memory budget {_gib(self.limit)}: made room for {self.expert_id} "
                f"(needs about {_gib(need)}; experts used {_gib(used)})"
            )
            try:
                after = await self._unload(self.peers[victim], reason)
            except grpc.aio.AioRpcError as e:
                log.info("could not unload %s for %s: %s", victim, self.expert_id, e.details())
                continue  # it became busy, or went away: try the next one
            log.info("unloaded idle expert %s to make room for %s", victim, self.expert_id)
            used -= infos[victim].memory_bytes - after.memory_bytes
            infos[victim] = after
