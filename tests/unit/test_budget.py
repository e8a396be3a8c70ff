"""The memory budget's calls to peer experts: over mTLS under internal_tls, with the expert's own
mesh certificate (a fake peer behind a real TLS gRPC server; the engines' side is proven by
tests/integration/test_expert_lifecycle.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from expertmesh.bench.pki import CA
from expertmesh.config import MeshConfig
from expertmesh.errors import ResourceExhausted
from expertmesh.rpc import bind
from expertmesh.services.expert.budget import MemoryBudget
from expertmesh.services.expert.memory import GIB
from expertmesh.services.expert.proctree import tree_rss
from expertmesh.tls import RequirePeerCertificate, expert_server_certs, has_peer_certificate
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..support import free_port

PEER_BYTES = 4 * GIB
NEED_BYTES = 1 * GIB


class Peer(pb_grpc.ExpertServicer):
    """An idle, loaded peer holding PEER_BYTES until it is unloaded."""

    def __init__(self, busy: bool = False) -> None:
        self.memory = PEER_BYTES
        self.busy = busy
        self.unloads: list[str] = []
        self.callers: list[str] = []  # the common name of each Info caller's certificate

    def _info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            expert_id="b",
            state=pb.EXPERT_STATE_READY if self.memory else pb.EXPERT_STATE_COLD,
            memory_bytes=self.memory,
            idle_seconds=30.0,
            requests_in_flight=1 if self.busy else 0,
        )

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        assert has_peer_certificate(context)
        names = (context.auth_context() or {}).get("x509_common_name", [b""])
        self.callers.append(names[0].decode())
        return self._info()

    async def Unload(self, request: pb.UnloadRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        self.unloads.append(request.reason)
        self.memory = 0
        return self._info()


def tls_mesh(tmp_path: Path, peer_port: int) -> MeshConfig:
    """Experts a and b under internal_tls, each with its own certificate, and a budget that holds
    this process and a's load but not b's memory as well."""
    ca = CA(tmp_path)
    limit = (tree_rss() + NEED_BYTES + PEER_BYTES // 2) / GIB
    experts: list[dict[str, Any]] = [
        {"expert_id": "a", "model_path": "/m/a", "domain": "general", "internal_cert": ca.issue("a").pair()},
        {
            "expert_id": "b",
            "model_path": "/m/b",
            "domain": "code",
            "port": peer_port,
            "internal_cert": ca.issue("b").pair(),
        },
    ]
    internal = {"ca_file": str(ca.file), **ca.issue("mesh").pair()}
    budget = {"memory_budget_gib": limit}
    return MeshConfig.model_validate({"experts": experts, "internal_tls": internal, **budget})


async def serve_peer(mesh: MeshConfig, peer: Peer) -> grpc.aio.Server:
    """``peer`` as expert b serves: its certificate, mesh client certificates required."""
    certs = expert_server_certs(mesh, "b")
    assert certs is not None
    server = grpc.aio.server(interceptors=[RequirePeerCertificate()])
    pb_grpc.add_ExpertServicer_to_server(peer, server)
    bind(server, "127.0.0.1", mesh.experts[1].port or 0, certs.credentials())
    await server.start()
    return server


def loading(mesh: MeshConfig) -> Any:
    """What make_room reads of the loading expert's lifecycle."""
    return SimpleNamespace(load_growth_bytes=NEED_BYTES, cfg=mesh.experts[0])


async def test_budget_unloads_an_idle_peer_over_internal_tls(tmp_path: Path) -> None:
    mesh, peer = tls_mesh(tmp_path, free_port()), Peer()
    server = await serve_peer(mesh, peer)
    try:
        budget = MemoryBudget.for_mesh(mesh, "a")
        assert budget is not None
        await budget.make_room(loading(mesh))
    finally:
        await server.stop(0)
    assert peer.callers == ["a"]  # Info over mTLS with a's own certificate, not the gateway's
    (reason,) = peer.unloads  # counted b's memory, and Unload (mesh certificates only) answered
    assert "made room for a" in reason


async def test_budget_counts_a_busy_peer_over_internal_tls(tmp_path: Path) -> None:
    mesh, peer = tls_mesh(tmp_path, free_port()), Peer(busy=True)
    server = await serve_peer(mesh, peer)
    try:
        budget = MemoryBudget.for_mesh(mesh, "a")
        assert budget is not None
        with pytest.raises(ResourceExhausted, match="no idle expert is left to unload"):
            await budget.make_room(loading(mesh))
    finally:
        await server.stop(0)
    assert peer.unloads == []
