"""The load generator as a separate process: an ordinary ``grpc.aio`` client, as a user runs one.

``python -m expertmesh.bench.remote [--place]``, driven over the line protocol of
:mod:`bench.child`: ``{"op": "run", "target", "service", ...}`` streams one load from a
target (``expert`` or ``gateway``) over one channel per target, kept for the whole run.
Started in a session of its own (:class:`RemoteClient`, ``placement="session"``) it is
scheduled as a program from another terminal is: with the kernel's autogroup scheduling, in a
scheduling group of its own; ``"same"`` runs it in the benchmark's (and ``up``'s) session;
``"placed"`` in a session of its own, but off vLLM's worker cores (:func:`expertmesh.cpus.place`).

Each reply carries, beside the load's result, the time the client's threads sat runnable in
the run queue without a CPU during the load (``/proc/self/task/*/schedstat``): how long the
scheduler starved the client.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import grpc

from expertmesh import cpus, loop
from expertmesh.client import build_request
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .child import LineChild, protocol_channel, sender, serve_commands
from .clients import mesh_client
from .load import BenchError, LoadResult, run_load
from .procs import Server

Placement = Literal["session", "same", "placed"]


def runqueue_wait_s() -> float:
    """Seconds every thread of this process has spent runnable but not running (since it began)."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    return total / 1e9


class _Client:
    """Child side: one channel per target, opened on first use."""

    def __init__(self, place: bool) -> None:
        self.place = place
        self.channels: dict[str, grpc.aio.Channel] = {}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        target, service = cmd["target"], cmd["service"]
        channel = self.channels.get(target)
        if channel is None:
            channel = self.channels[target] = grpc.aio.insecure_channel(target)
        stub = pb_grpc.GatewayStub(channel) if service == "gateway" else pb_grpc.ExpertStub(channel)
        requests = [
            build_request(
                p,
                domain=cmd["domain"],
                max_tokens=cmd["max_tokens"],
                temperature=cmd["temperature"],
                ignore_eos=True,
            )
            for p in cmd["prompts"]
        ]
        if self.place:  # as the gateway does: look again, engines come and go
            cpus.place()
        waited = runqueue_wait_s()
        try:
            result = await run_load(
                mesh_client(stub.Generate, requests), cmd["concurrency"], cmd["requests"], cmd["max_tokens"]
            )
        except (BenchError, grpc.aio.AioRpcError) as e:
            return {"error": str(e)}
        return {"result": asdict(result), "runqueue_wait_s": runqueue_wait_s() - waited}


async def _serve(place: bool) -> None:
    send = sender(protocol_channel())
    client = _Client(place)
    try:
        send({"ready": True})
        await serve_commands(send, client.handle)
    finally:
        for channel in client.channels.values():
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    """Child side: serve load commands from stdin."""
    parser = argparse.ArgumentParser(prog="python -m expertmesh.bench.remote", description=__doc__)
    parser.add_argument("--place", action="store_true", help="keep off vLLM's worker cores")
    args = parser.parse_args(argv)
    loop.run(_serve(args.place))
    return 0


class RemoteClient(LineChild):
    """Parent side: the client process, placed as ``placement`` says (see the module docstring)."""

    def __init__(self, name: str, placement: Placement, log_dir: Path) -> None:
        args = ["--place"] if placement == "placed" else []
        super().__init__(Server.python_module(name, "expertmesh.bench.remote", args, log_dir))
        self.placement = placement

    async def start_client(self) -> float:
        """Start the process where its placement says."""
        return await self.start(new_session=self.placement != "same")

    async def run(
        self,
        target: str,
        service: str,
        domain: str,
        prompts: list[str],
        concurrency: int,
        requests: int,
        max_tokens: int,
        temperature: float,
    ) -> tuple[LoadResult, float]:
        """One load from the client process: its result and the client's run-queue wait (s)."""
        reply = await self.ask(
            {
                "op": "run",
                "target": target,
                "service": service,
                "domain": domain,
                "prompts": prompts[:requests],
                "concurrency": concurrency,
                "requests": requests,
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
        )
        return LoadResult(**reply["result"]), float(reply["runqueue_wait_s"])


if __name__ == "__main__":
    sys.exit(main())
