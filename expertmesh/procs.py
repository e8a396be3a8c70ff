"""Child processes, one way for the supervisor, the benchmark and the tests: spawn in its own
process group, record descendants, wait for health, stop with grace then kill.

A child gets its own process group (so that one signal reaches its engine processes too) but
stays in the caller's session: with the kernel's autogroup scheduling a session is a
scheduling group, and a process in another session than the experts was measured starved for
seconds by the engine's worker, its streams arriving whole at their end. Never
``start_new_session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .rpc import open_channel

#: Between two health checks while waiting for a child to serve.
POLL_S = 0.2


def spawn(argv: list[str], new_session: bool = False, **popen: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` in its own process group, in this session (module docstring).

    ``new_session``: in a session of its own instead, as a program started from another terminal
    runs (with autogroup scheduling, a scheduling group of its own); it leads its group either way.
    """
    where: dict[str, Any] = {"start_new_session": True} if new_session else {"process_group": 0}
    return subprocess.Popen(argv, **where, **popen)


async def spawn_async(argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
    """:func:`spawn` for asyncio: the same group and session."""
    return await asyncio.create_subprocess_exec(*argv, process_group=0, **kw)


class Family:
    """A child's process group and every descendant seen under it (one that left the group,
    as vLLM's engine processes may, is still stopped)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.descendants: dict[int, psutil.Process] = {}

    def record(self) -> list[psutil.Process]:
        """Remember the descendants alive now; returns the direct children."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            self.descendants.update({p.pid: p for p in root.children(recursive=True)})
            return root.children()
        return []

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (gone already: nothing to do)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group and every recorded descendant."""
        self.signal(signal.SIGKILL)
        for proc in self.descendants.values():
            # psutil checks the process's start time, so a reused pid is never killed.
            with contextlib.suppress(psutil.Error):
                proc.kill()


def stop(proc: subprocess.Popen[Any], grace: float, family: Family | None = None) -> int:
    """SIGTERM the group, wait up to ``grace``, then SIGKILL the group and its descendants;
    returns the exit code. Synchronous, so that it also runs after Ctrl-C."""
    family = family or Family(proc.pid)
    family.record()
    if proc.poll() is None:
        family.signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    family.kill()
    return proc.wait(10)


async def stop_async(proc: subprocess.Popen[Any], grace: float, family: Family | None = None) -> int | None:
    """:func:`stop` without blocking the event loop; None if it has not exited after the kill."""
    family = family or Family(proc.pid)
    family.record()
    if proc.poll() is None:
        family.signal(signal.SIGTERM)
        await wait_exit(proc, grace)
    family.kill()
    await wait_exit(proc, 10)
    return proc.poll()


async def wait_exit(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to exit; True when it has."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll() is not None


async def wait_serving(
    address: str,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    """Wait until grpc.health.v1 ``Check`` (service "") at ``address`` answers SERVING; False
    after ``timeout``. ``alive`` raises when the child has exited (no waiting for a dead one);
    ``credentials``: the server speaks TLS."""
    deadline = time.monotonic() + timeout
    async with open_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            alive()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(POLL_S)
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (bind port 0 and read what the kernel gave), for a child
    to listen on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
