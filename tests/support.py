"""Helpers shared by the tests: free ports, mesh configs on the demo models, health waits."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh import demo_models
from expertmesh.config import MeshConfig
from expertmesh.procs import free_port

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
GRPCURL = str(VENV_BIN / "grpcurl")
EXPERTMESH = str(VENV_BIN / "expertmesh")


def demo_expert(expert_id: str, domain: str, model: str = "demo-general", **extra: Any) -> dict[str, Any]:
    """An expert entry on one of the tiny demo models, on a free port."""
    port = extra.pop("port", None) or free_port()
    return demo_models.demo_expert(expert_id, domain, model, port, **extra)


def write_config(path: Path, experts: list[dict[str, Any]], **mesh: Any) -> Path:
    """Write a mesh config with a free gateway port (``gateway`` adds settings); returns its path."""
    data = {
        "gateway": {"host": "127.0.0.1", "port": free_port(), **mesh.pop("gateway", {})},
        "grace_period_s": 15,
        # The test client runs in up's session, so nothing here needs up's group to yield; and on
        # a shared host a group at nice 10 waits behind every other session's work (its engines
        # were seen taking over 5 minutes to load beside other test suites).
        "session_nice": None,
        **mesh,
        "experts": experts,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """The grpc.health.v1 status name at ``address``, or UNREACHABLE."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def wait_serving(address: str, timeout: float = 300.0) -> None:
    """Wait until ``address`` reports SERVING (checked on gRPC health, no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await health_status(address) == "SERVING":
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


@dataclass
class Up:
    """A running `expertmesh up` and where its output goes."""

    proc: subprocess.Popen[bytes]
    config: MeshConfig
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    async def wait_for_line(self, fragment: str, timeout: float = 60) -> str:
        """The first output line containing ``fragment`` (the output is read as it grows)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if lines := [line for line in self.text().splitlines() if fragment in line]:
                return lines[0]
            if self.proc.poll() is not None and fragment not in self.text():
                break
            await asyncio.sleep(0.2)
        raise AssertionError(f"no line with {fragment!r} in the output of up:\n{self.text()}")
