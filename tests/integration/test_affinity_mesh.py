"""Prefix-aware replica choice with real engines: two local replicas of one expert under ``up``.

Requests that share a long prefix land on one replica (the route explanation names it); when
that replica is busy (over its bounded load) or down, they go to the other one, least
outstanding first, and back to it once it serves again. Two engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from expertmesh.bench.chaos_mesh import Mesh, free_port_pair
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..support import demo_expert, free_port, wait_serving

pytestmark = pytest.mark.engine
SHARED = "System: you are the operations assistant. Answer briefly and precisely. " * 12  # ~900 chars
QUESTIONS = [f"Question {i}: what does step {i} of the runbook do?" for i in range(8)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    port = free_port_pair()
    data = {
        "gateway": {"host": "127.0.0.1", "port": free_port()},
        "grace_period_s": 10,
        "session_nice": None,  # the test runs in up's session (see tests/support.py)
        "max_restarts": 5,
        "routing": {"affinity": "prefix", "affinity_prefix_chars": 512},
        "experts": [demo_expert("general_tiny", "general", port=port, local_replicas=2)],
    }
    mesh = Mesh(data, tmp_path_factory.mktemp("affinity"))
    mesh.start()
    try:
        asyncio.run(_whole(mesh))
        yield mesh
    finally:
        mesh.stop()


def _replicas(mesh: Mesh) -> list[str]:
    port = int(mesh.data["experts"][0]["port"])
    return [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]


async def _view(gateway: pb_grpc.GatewayStub) -> dict[str, pb.ReplicaStatus]:
    listed = await gateway.ListExperts(pb.ListExpertsRequest(), timeout=5)
    return {r.address: r for e in listed.experts for r in e.replicas}


async def _whole(mesh: Mesh, timeout: float = 300) -> None:
    """Every replica SERVING, and so in the gateway's view (polled, no fixed sleep)."""
    for address in [*_replicas(mesh), mesh.gateway]:
        await wait_serving(address, timeout)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        deadline = time.monotonic() + 60
        while not all(r.health == "SERVING" and not r.ejected_for_s for r in (await _view(stub)).values()):
            assert time.monotonic() < deadline, await _view(stub)
            await asyncio.sleep(0.2)


def _request(text: str, tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=text,
        domain="general",
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
    )


async def _served_by(stub: pb_grpc.GatewayStub, text: str) -> str:
    """The replica the route explanation names on the first message; the stream read to its end."""
    address = ""
    async for msg in stub.Generate(_request(text), timeout=60):
        address = address or msg.route.address
    return address


def _replica_pid(mesh: Mesh, address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    for child in psutil.Process(mesh.proc.pid).children():  # type: ignore[union-attr]
        with contextlib.suppress(psutil.Error):
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in child.net_connections()):
                return child.pid
    raise LookupError(address)


async def test_a_shared_prefix_lands_on_one_replica_and_distinct_ones_on_both(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        shared = {await _served_by(stub, SHARED + q) for q in QUESTIONS}
        assert len(shared) == 1 and shared <= set(_replicas(mesh))
        # Different prefixes spread over both (16 keys all on one replica: 2^-15).
        distinct = {await _served_by(stub, f"Prefix {i}. " * 60 + "hello") for i in range(16)}
        assert distinct == set(_replicas(mesh))


async def test_a_busy_home_replica_falls_back_to_the_other(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        home = await _served_by(stub, SHARED + "warm up")
        # Two long streams on the home replica: it now holds 2, its bound at 1.25 over 2
        # replicas is ceil(1.25 * 3 / 2) = 2, so a third request of the prefix goes elsewhere.
        long = [stub.Generate(_request(SHARED + f"long {i}", tokens=500), timeout=120) for i in range(2)]
        firsts = [await call.read() for call in long]
        assert [m.route.address for m in firsts] == [home, home]
        third = await _served_by(stub, SHARED + "while it is busy")
        for call in long:
            call.cancel()
        assert third != home and third in _replicas(mesh)


async def test_a_home_replica_that_is_down_falls_back_and_gets_its_keys_back(mesh: Mesh) -> None:
    await _whole(mesh)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        stub = pb_grpc.GatewayStub(channel)
        home = await _served_by(stub, SHARED + "before")
        other = next(a for a in _replicas(mesh) if a != home)
        mesh.send(_replica_pid(mesh, home), signal.SIGKILL)  # up restarts it (an engine start: ~20 s)
        deadline = time.monotonic() + 30
        while (await _view(stub))[home].health == "SERVING":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await _served_by(stub, SHARED + "while it is down") == other
    await _whole(mesh)
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        assert await _served_by(pb_grpc.GatewayStub(channel), SHARED + "after") == home
