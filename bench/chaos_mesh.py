"""The mesh the chaos suite breaks: its config, the ``expertmesh up`` process, its children, health.

Two experts on the tiny demo models: ``code_tiny`` (domain code, the one every fault hits) with
fallback to ``general_tiny`` (domain general). ``up`` runs in its own process group, so that
Ctrl-C at the terminal reaches only the harness, which then stops the mesh in order: SIGCONT
to anything it stopped, SIGTERM to ``up`` (which stops its children within the grace period),
then SIGKILL to every process of the tree still alive. Health is polled on grpc.health.v1 by a
:class:`HealthMonitor`, whose timeline says afterwards whether a healthy candidate existed when
a request failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import psutil
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh import cpus, demo_models, procs
from expertmesh.config import load_config
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .procs import free_port

CODE, GENERAL = "code_tiny", "general_tiny"
#: How often the monitor asks every address, and how long one answer may take.
POLL_S, CHECK_TIMEOUT_S = 0.1, 0.3
#: Short reconnect backoff, so that what is measured is the mesh coming back, not the client's
#: exponential backoff after a refused connection (gRPC's default starts at 1 s, up to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
#: Time ``up`` may take to stop beyond the mesh's grace period before its tree is SIGKILLed.
STOP_MARGIN_S = 30.0


#: The code expert's engine watchdog (stall_timeout_s).
STALL_S = 3.0


def free_port_pair() -> int:
    """A port that is free, and the one after it too (for two local replicas)."""
    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port


class MeshError(Exception):
    """The mesh could not be started or did not become whole again; the message says which part."""


def mesh_config(first_token_timeout_s: float, grace_period_s: float = 10.0) -> dict[str, Any]:
    """The suite's mesh config as a mapping (free ports now, demo models, fallback code -> general)."""
    routing: dict[str, Any] = {
        "fallbacks": {"code": ["general"]},
        "first_token_timeout_s": first_token_timeout_s,
    }
    # Two local replicas of the expert every fault hits, so that a stream cut on one resumes on
    # the other; the engine watchdog ends a stalled engine's streams after STALL_S.
    code = demo_models.demo_expert(CODE, "code", "demo-code", free_port_pair(), local_replicas=2)
    code["stall_timeout_s"] = STALL_S
    return {
        "default_domain": "general",
        "gateway": {"host": "127.0.0.1", "port": free_port()},
        "grace_period_s": grace_period_s,
        "max_restarts": 50,  # every fault that ends a process costs one restart
        "routing": routing,
        "experts": [
            demo_models.demo_expert(GENERAL, "general", "demo-general", free_port()),
            code,
        ],
    }


@dataclass
class Mesh:
    """One ``expertmesh up`` process on a config file this suite writes (and may rewrite)."""

    data: dict[str, Any]
    folder: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: set[int] = field(default_factory=set)
    family: procs.Family | None = None
    _log: IO[bytes] | None = None

    @property
    def config_path(self) -> Path:
        """The mesh config file."""
        return self.folder / "mesh.yaml"

    @property
    def gateway(self) -> str:
        """The gateway's host:port."""
        return f"127.0.0.1:{self.data['gateway']['port']}"

    def addresses(self) -> dict[str, str]:
        """Name -> host:port of the gateway and every expert."""
        experts = {e["expert_id"]: f"127.0.0.1:{e['port']}" for e in self.data["experts"]}
        return {"gateway": self.gateway, **experts}

    def write(self, data: dict[str, Any]) -> None:
        """Write ``data`` as the config file, validated first by the mesh's own config model."""
        tmp = self.config_path.with_suffix(".tmp.yaml")
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        load_config(tmp)  # raises ConfigError naming the key when the model refuses it
        tmp.replace(self.config_path)  # atomically: the gateway may re-read it at any moment

    def start(self) -> None:
        """Write the config and start ``expertmesh up`` (logs under ``folder/logs``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write(self.data)
        self._log = (self.folder / "up.log").open("ab")
        argv = [sys.executable, "-m", "expertmesh.cli", "up", "--config", str(self.config_path)]
        self.proc = procs.spawn(
            [*argv, "--log-dir", str(self.folder / "logs")],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def check_alive(self) -> None:
        """Raise MeshError (with the log tail) when ``up`` has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = (self.folder / "up.log").read_text(errors="replace").splitlines()[-25:]
            raise MeshError(f"expertmesh up exited with code {self.proc.returncode}:\n" + "\n".join(tail))

    def _children(self) -> list[psutil.Process]:
        assert self.proc is not None
        self.family = self.family or procs.Family(self.proc.pid)
        kids = psutil.Process(self.proc.pid).children()
        self.family.record()
        return kids

    def child_pid(self, needle: str) -> int:
        """The pid of the supervisor's child whose command line contains ``needle``."""
        for child in self._children():
            with contextlib.suppress(psutil.Error):
                if needle in " ".join(child.cmdline()):
                    return child.pid
        raise MeshError(f"no process of the mesh runs {needle!r}")

    def expert_pid(self, expert_id: str) -> int:
        """The expert's own process (not its engine's)."""
        return self.child_pid(f"--expert-id {expert_id}")

    def gateway_pid(self) -> int:
        """The gateway's process."""
        return self.child_pid("expertmesh.gateway")

    def engine_core_pid(self, expert_id: str) -> int:
        """The expert's vLLM engine-core process (a child that vLLM titles ``VLLM::EngineCore``)."""
        for proc in psutil.Process(self.expert_pid(expert_id)).children(recursive=True):
            if cpus.vllm_role(proc).startswith("EngineCore"):
                return proc.pid
        raise MeshError(f"expert {expert_id} has no EngineCore process")

    def send(self, pid: int, sig: signal.Signals) -> None:
        """Send ``sig`` to ``pid``, remembering stopped processes so that :meth:`stop` resumes them."""
        self._children()
        if sig == signal.SIGCONT:
            self.stopped.discard(pid)
            with contextlib.suppress(ProcessLookupError):  # `up` may have replaced a hung process
                os.kill(pid, sig)
            return
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(pid)

    def reload(self, data: dict[str, Any]) -> None:
        """Rewrite the config and ask ``up`` to make the gateway re-read it (SIGHUP)."""
        self.write(data)
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        """Stop the whole tree, whatever state it is in; synchronous, so it also runs after Ctrl-C."""
        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error, MeshError):
            self._children()
        for pid in list(self.stopped):  # a stopped process cannot act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(float(self.data["grace_period_s"]) + STOP_MARGIN_S)
        (self.family or procs.Family(self.proc.pid)).kill()  # the group and every descendant seen
        self.proc.wait(10)
        if self._log is not None:
            self._log.close()


@dataclass
class HealthMonitor:
    """Polls grpc.health.v1 ``Check`` of every address; keeps a timeline of what each answered."""

    addresses: dict[str, str]
    timeline: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    async def run(self) -> None:
        """Poll until cancelled."""
        channels = {
            n: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for n, a in self.addresses.items()
        }
        stubs = {n: health_pb2_grpc.HealthStub(c) for n, c in channels.items()}
        try:
            while True:
                names = list(stubs)
                answers = await asyncio.gather(*(_check(stubs[n]) for n in names))
                self.timeline.append((time.monotonic(), dict(zip(names, answers, strict=True))))
                await asyncio.sleep(POLL_S)
        finally:
            for channel in channels.values():
                await channel.close()

    def at(self, when: float) -> dict[str, str]:
        """What every address last answered at or before ``when`` (UNKNOWN before the first poll)."""
        found = dict.fromkeys(self.addresses, "UNKNOWN")
        for t, sample in self.timeline:
            if t > when:
                break
            found = sample
        return found

    def latest(self) -> dict[str, str]:
        """The last sample."""
        return self.timeline[-1][1] if self.timeline else dict.fromkeys(self.addresses, "UNKNOWN")


async def _check(stub: health_pb2_grpc.HealthStub) -> str:
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
    except grpc.aio.AioRpcError:
        return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def gateway_view(gateway: str) -> list[pb.ReplicaStatus]:
    """Every replica as the gateway sees it (ListExperts); empty when it does not answer."""
    async with grpc.aio.insecure_channel(gateway) as channel:
        try:
            reply = await pb_grpc.GatewayStub(channel).ListExperts(pb.ListExpertsRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return []
    return [r for e in reply.experts for r in e.replicas]


async def wait_whole(mesh: Mesh, monitor: HealthMonitor, timeout: float) -> float:
    """Wait until every process answers SERVING and the gateway routes to every replica again
    (SERVING, not ejected); returns the seconds waited. Polls health, never a fixed sleep."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        mesh.check_alive()
        if all(s == "SERVING" for s in monitor.latest().values()):
            view = await gateway_view(mesh.gateway)
            if view and all(r.health == "SERVING" and r.ejected_for_s == 0 for r in view):
                return time.monotonic() - started
        await asyncio.sleep(POLL_S)
    raise MeshError(f"mesh not whole after {timeout:.0f} s: {monitor.latest()}")
