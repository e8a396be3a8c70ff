"""Hangs are seen, not waited out: an engine that stops making progress inside a live expert, and
a process that stops answering under ``expertmesh up``.

1. A real expert (``stall_timeout_s: 2``) whose engine core is SIGSTOPped mid-stream: the stream
   ends UNAVAILABLE naming the stall, health turns NOT_SERVING, the process exits 1 (for a restart).
2. ``up`` with ``unresponsive_restart_s: 5``: a SIGSTOPped gateway is killed and started again.
3. Stopping: the gateway gets SIGTERM first, the experts once it is gone; health Watch streams end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh.config import load_config
from expertmesh.cpus import vllm_role
from expertmesh.rpc import Health, bind
from expertmesh.supervisor import Supervisor
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import start_expert, stop_group
from ..support import VENV_BIN, demo_expert, wait_serving, write_config


@pytest.mark.engine
async def test_a_stalled_engine_fails_its_streams_and_the_expert(
    tmp_path: Path, demo_models: list[Path]
) -> None:
    path = write_config(tmp_path / "mesh.yaml", [demo_expert("stalling", "general", stall_timeout_s=2)])
    address = load_config(path).expert_address(0)
    proc = start_expert(path, "stalling", tmp_path / "logs")
    core: psutil.Process | None = None
    try:
        await wait_serving(address, timeout=300)
        (core,) = [
            p for p in psutil.Process(proc.pid).children(recursive=True) if vllm_role(p) == "EngineCore"
        ]
        async with grpc.aio.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            statuses = asyncio.create_task(_statuses(watch))
            request = pb.GenerateRequest(
                prompt="go", sampling=pb.SamplingParams(max_tokens=900, ignore_eos=True, temperature=0)
            )
            call = pb_grpc.ExpertStub(channel).Generate(request, timeout=60)
            messages = call.__aiter__()
            await anext(messages)
            core.suspend()  # SIGSTOP: the process lives, the engine makes no progress
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while True:
                    await anext(messages)
            seen = await asyncio.wait_for(statuses, 60)  # the Watch ends as the process stops
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (err.value.details() or "").startswith(
            "expert stalling is FAILED: engine stalled: no output for"
        )
        assert "(stall_timeout_s=2)" in (err.value.details() or "")
        assert await asyncio.to_thread(proc.wait, 60) == 1  # exits so that it is restarted
        # what its health said before it went: SERVING, then NOT_SERVING (never silence)
        assert seen[0] == health_pb2.HealthCheckResponse.SERVING, seen
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
    finally:
        if core is not None:
            with contextlib.suppress(psutil.Error):
                core.resume()
        stop_group(proc)


async def _statuses(watch: Any) -> list[int]:
    """Every status a health Watch stream sent until it ended (or its server went away)."""
    seen: list[int] = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for reply in watch:
            seen.append(reply.status)
    return seen


async def _serving_pid(out: Path, name: str, after: int = 0) -> int:
    """The pid of ``up``'s child ``name`` once ``up`` has reported it SERVING (``after`` such reports)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if text.count(f"{name}: SERVING at") > after:
            started = [line for line in text.splitlines() if f"{name}: started (pid " in line]
            return int(started[-1].split("(pid ")[1].split(",")[0])
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{name} never SERVING: {out.read_text()}")


async def test_up_restarts_a_child_that_stops_answering(tmp_path: Path) -> None:
    # A lazy expert whose model does not exist is SERVING while COLD (no engine): all this test
    # needs of it, for the gateway to serve; the gateway is the child that hangs.
    expert = demo_expert("broken", "general", load="lazy")
    expert["model_path"] = str(tmp_path / "no-model-here")
    path = write_config(tmp_path / "mesh.yaml", [expert], unresponsive_restart_s=5)
    out = tmp_path / "up.out"
    up = subprocess.Popen(
        [str(VENV_BIN / "expertmesh"), "up", "--config", str(path), "--log-dir", str(tmp_path / "logs")],
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        first = await _serving_pid(out, "gateway")
        os.kill(first, signal.SIGSTOP)
        second = await _serving_pid(out, "gateway", after=1)
        assert second != first
        with contextlib.suppress(psutil.NoSuchProcess):  # the hung one is gone (or a zombie)
            assert psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    text = out.read_text(errors="replace")
    assert "gateway: no answer to health checks for" in text and "(unresponsive_restart_s=5)" in text
    assert "gateway: restart 1/" in text
    assert "broken: no answer" not in text  # the expert kept answering: left alone


SIGTERM_LOGGER = """
import signal, sys, time
def stop(*_):
    with open(sys.argv[1], "a") as f:
        f.write(f"{sys.argv[2]} {time.monotonic()}\\n")
    time.sleep(0.3)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
"""


async def test_stop_takes_the_gateway_down_first(tmp_path: Path) -> None:
    path = write_config(tmp_path / "mesh.yaml", [demo_expert("a", "general"), demo_expert("b", "code")])
    log = tmp_path / "sigterms.txt"
    supervisor = Supervisor(load_config(path), path, tmp_path / "logs", report=lambda _: None)
    for child in supervisor.children:  # stand-ins that note when SIGTERM reached them
        child.argv = [sys.executable, "-c", SIGTERM_LOGGER, str(log), child.name]
    await supervisor.start()
    deadline = time.monotonic() + 30
    while not all(c.proc is not None for c in supervisor.children):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # let the interpreters install their handlers
    await supervisor.stop()
    order = sorted((float(t), name) for name, t in (line.split() for line in log.read_text().splitlines()))
    names = [name for _, name in order]
    assert names[0] == "gateway" and sorted(names[1:]) == ["a", "b"]
    assert order[1][0] - order[0][0] >= 0.3  # the experts only once the gateway had exited


async def test_health_watch_streams_end_on_shutdown() -> None:
    server = grpc.aio.server()
    health = Health(server, ["svc"])
    await health.set(True)
    port = bind(server, "127.0.0.1", 0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="svc"))
            statuses = []
            closing = None
            async for reply in watch:
                statuses.append(reply.status)
                if closing is None:
                    closing = asyncio.create_task(health.close())
            await closing
            assert statuses == [
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            ]
            assert await watch.code() == grpc.StatusCode.OK  # ended, not left open for the grace period
    finally:
        await server.stop(0)
