"""Failover with real expert processes: a truthful route explanation, a hung expert, a killed one.

One `expertmesh up` mesh (general + code, fallback code -> general), two engines. The tests
run in file order: explanation first, then SIGSTOP (the expert is resumed after), then kill -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.services.expert.ipc_dir import dirs_of as ipc_dirs
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..support import VENV_BIN, demo_expert, wait_serving, write_config

pytestmark = pytest.mark.engine


class Mesh:
    def __init__(self, proc: subprocess.Popen[bytes], config: MeshConfig) -> None:
        self.proc = proc
        self.config = config
        self.gateway = f"127.0.0.1:{config.gateway.port}"

    def expert_pid(self, expert_id: str) -> int:
        """The expert's own process (not its engine's children)."""
        for child in psutil.Process(self.proc.pid).children():
            if f"--expert-id {expert_id}" in " ".join(child.cmdline()):
                return child.pid
        raise LookupError(expert_id)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("failover")
    path = write_config(
        tmp / "mesh.yaml",
        [demo_expert("general_tiny", "general"), demo_expert("code_tiny", "code", "demo-code")],
        default_domain="general",
        max_restarts=0,  # a killed expert stays dead here; restarts are tested elsewhere
        routing={
            "fallbacks": {"code": ["general"]},
            "eject_after_failures": 2,
            "first_token_timeout_s": 2,  # a hung replica is left well inside the callers' 5 s
            "domains": {"code": {"code": True, "keywords": ["python"]}},
        },
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(tmp / "logs")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mesh = Mesh(proc, load_config(path))
    asyncio.run(wait_all(mesh))
    yield mesh
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


async def wait_all(mesh: Mesh) -> None:
    for i in range(len(mesh.config.experts)):
        await wait_serving(mesh.config.expert_address(i), timeout=300)
    await wait_serving(mesh.gateway, timeout=30)


async def replicas(client: MeshClient) -> dict[str, pb.ReplicaStatus]:
    return {e.expert_id: e.replicas[0] for e in (await client.list_experts()).experts}


async def test_route_explanation_is_truthful(mesh: Mesh) -> None:
    """A classified request: the dry run and the first message name the expert that really served."""
    prompt = "def add(a, b):\n    return a + b\n"
    async with grpc.aio.insecure_channel(mesh.gateway) as channel:
        dry = await pb_grpc.GatewayStub(channel).Route(pb.GenerateRequest(prompt=prompt))
    assert (dry.domain, dry.signal, dry.expert_id) == ("code", "code", "code_tiny")
    assert dry.confidence >= 0.5
    assert list(dry.candidates) == ["code_tiny", "general_tiny"]
    async with MeshClient(mesh.gateway, timeout=60) as client:
        messages = [m async for m in client.stream(prompt, max_tokens=8)]
    route = messages[0].route
    assert (route.domain, route.signal, route.expert_id) == ("code", "code", "code_tiny")
    assert route.address == mesh.config.expert_address(1)
    assert {m.expert_id for m in messages} == {route.expert_id}
    assert [v.signal for v in route.votes] == ["code"]


async def test_hung_expert_requests_keep_their_deadline_and_it_is_ejected(mesh: Mesh) -> None:
    """SIGSTOP the code expert: requests with a 5 s deadline end by then (no first token from it in
    first_token_timeout_s: the fallback serves them); its replica is ejected."""
    pid = mesh.expert_pid("code_tiny")
    os.kill(pid, signal.SIGSTOP)
    try:
        async with MeshClient(mesh.gateway, timeout=5) as client:

            async def one() -> tuple[float, str]:
                started = time.monotonic()
                try:
                    result = await client.complete("x = 1", domain="code", max_tokens=4)
                    outcome = f"served by {result.expert_id}"
                except grpc.aio.AioRpcError as e:
                    outcome = e.code().name
                return time.monotonic() - started, outcome

            results = await asyncio.gather(*(one() for _ in range(4)))
            print(f"\nrequests to a hung expert: {results}")
            assert max(elapsed for elapsed, _ in results) < 5.5
            assert {outcome for _, outcome in results} <= {"served by general_tiny", "DEADLINE_EXCEEDED"}
            code = (await replicas(client))["code_tiny"]
            print(f"hung replica as the gateway sees it: {code}")
            assert code.ejections >= 1
    finally:
        os.kill(pid, signal.SIGCONT)
    async with MeshClient(mesh.gateway, timeout=30) as client:
        deadline = time.monotonic() + 30
        while True:  # resumed: a passing health check brings it back
            code = (await replicas(client))["code_tiny"]
            if code.health == "SERVING" and code.ejected_for_s == 0:
                break
            assert time.monotonic() < deadline, code
            await asyncio.sleep(0.2)
        assert (await client.complete("x = 1", domain="code", max_tokens=4)).expert_id == "code_tiny"


async def test_kill_9_during_16_streams(mesh: Mesh) -> None:
    """Streams without a token yet complete on the fallback; mid-stream ones end UNAVAILABLE naming it."""
    pid = mesh.expert_pid("code_tiny")
    first_token = [asyncio.Event() for _ in range(16)]
    killed = asyncio.Event()

    async with MeshClient(mesh.gateway, timeout=120) as client:

        async def stream(i: int) -> str:
            await asyncio.sleep(0.15 * i)  # staggered, so some start after the kill
            served_by = ""
            try:
                async for msg in client.stream("Once upon", domain="code", max_tokens=900, ignore_eos=True):
                    served_by = served_by or msg.expert_id
                    first_token[i].set()
                return f"completed on {served_by}" + (" after the kill" if killed.is_set() else "")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                assert "expert code_tiny" in (e.details() or ""), e.details()
                assert first_token[i].is_set(), "failed without a token: should have failed over"
                return "mid-stream UNAVAILABLE"

        tasks = [asyncio.create_task(stream(i)) for i in range(16)]
        while sum(e.is_set() for e in first_token) < 4:
            await asyncio.sleep(0.01)
        assert ipc_dirs(pid)  # where its engine's sockets are; kill -9 gives it no time to remove it
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        killed.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
        counts = Counter(outcomes)
        print(f"\nkill -9 of code_tiny during 16 streams: {dict(counts)}")
        assert sum(counts.values()) == 16
        assert counts["mid-stream UNAVAILABLE"] >= 1
        assert counts["completed on general_tiny after the kill"] >= 1
        assert set(counts) <= {
            "mid-stream UNAVAILABLE",
            "completed on general_tiny after the kill",
            "completed on code_tiny",  # finished before the kill
        }
        # detection: the next request after the kill is served by the fallback at once
        result = await client.complete("x", domain="code", max_tokens=2)
        assert result.expert_id == "general_tiny"
        print(f"kill -9 -> all 16 streams settled in {time.monotonic() - killed_at:.2f} s")
    deadline = time.monotonic() + 10
    while ipc_dirs(pid):  # the supervisor removes it when it sees the expert gone
        assert time.monotonic() < deadline, ipc_dirs(pid)
        await asyncio.sleep(0.1)
