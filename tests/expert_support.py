"""Helpers for the expert tests: run expert processes, read Info, wait for a state."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path

import grpc
import psutil

from expertmesh import procs
from expertmesh.cpus import vllm_role
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .support import VENV_BIN


def start_expert(config: Path, expert_id: str, log_dir: Path) -> subprocess.Popen[bytes]:
    """``python -m expertmesh.services.expert`` in its own process group, logging to a file.

    In the test's session, as ``up`` runs its experts: with the kernel's autogroup scheduling a
    session is a scheduling group, and a test process in another group than the experts' was
    starved for seconds by their engine's worker (its streams arrived whole at their end).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{expert_id}.log").open("ab") as out:
        argv = [str(VENV_BIN / "python"), "-m", "expertmesh.services.expert", "--config", str(config)]
        return procs.spawn([*argv, "--expert-id", expert_id], stdout=out, stderr=subprocess.STDOUT)


def start_gateway(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``python -m expertmesh.gateway`` in its own process group, logging to the file ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        argv = [str(VENV_BIN / "python"), "-m", "expertmesh.gateway", "--config", str(config)]
        return procs.spawn(argv, stdout=out, stderr=subprocess.STDOUT)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``timeout``."""
    procs.stop(proc, timeout)


async def info(address: str, timeout: float = 5) -> pb.InfoResponse:
    """The expert's Info."""
    async with grpc.aio.insecure_channel(address) as channel:
        return await pb_grpc.ExpertStub(channel).Info(pb.InfoRequest(), timeout=timeout)


async def wait_state(address: str, state: int, timeout: float = 300) -> pb.InfoResponse:
    """Poll Info until the expert is in ``state`` (no fixed sleeps: each poll is an RPC)."""
    deadline = time.monotonic() + timeout
    last: pb.InfoResponse | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError):
            last = await info(address, timeout=2)
            if last.state == state:
                return last
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} not {pb.ExpertState.Name(state)} after {timeout} s; last Info: {last}")  # type: ignore[arg-type]


def thread_cores(proc: psutil.Process) -> frozenset[int]:
    """The cores any thread of ``proc`` may run on."""
    return frozenset(c for t in proc.threads() for c in os.sched_getaffinity(t.id))


def all_workers(pid: int) -> list[psutil.Process]:
    """vLLM's worker processes under ``pid``."""
    return [p for p in psutil.Process(pid).children(recursive=True) if vllm_role(p).startswith("Worker")]


def assert_off_worker_cores(pid: int) -> None:
    """The expert ``pid`` and its engine core run, every thread, only where its worker does not.

    vLLM binds the worker to all the cores the expert was started with but the reserved ones;
    the expert and the engine core must be on exactly those reserved ones.
    """
    started_with = frozenset(os.sched_getaffinity(0))  # the tests start experts from here
    root = psutil.Process(pid)
    cores = {"expert": thread_cores(root)}
    for proc in root.children(recursive=True):
        if role := vllm_role(proc):
            cores[role] = thread_cores(proc)
    worker = cores.get("Worker", frozenset())
    assert worker and worker < started_with, cores
    assert cores["expert"] == cores["EngineCore"] == started_with - worker, cores
