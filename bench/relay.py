"""A bare gRPC relay: one ``Generate`` call to the expert per request, and nothing else.

It serves ``expertmesh.v1.Gateway/Generate`` by passing each request to one expert and
streaming the answer back: no routing, health watching, failover, telemetry or logging. The
benchmark measures it beside the gateway (scenario ``relay``): what a per-call Python gRPC hop
costs by itself (same gRPC library, same event loop), against the gateway's multiplexed link.

    python -m expertmesh.bench.relay --target HOST:PORT --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from expertmesh import cpus
from expertmesh.loop import run
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc


class Relay(pb_grpc.GatewayServicer):
    """Generate, passed through to one expert over one shared channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.generate = pb_grpc.ExpertStub(channel).Generate

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async for msg in self.generate(request):
            yield msg


async def serve(target: str, host: str, port: int) -> None:
    """Serve until terminated (health SERVING from the start: it has nothing to load)."""
    async with grpc.aio.insecure_channel(target) as channel:
        server = grpc.aio.server()
        pb_grpc.add_GatewayServicer_to_server(Relay(channel), server)
        checks = health.aio.HealthServicer()
        await checks.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        server.add_insecure_port(f"{host}:{port}")
        await server.start()
        placing = asyncio.create_task(cpus.keep_placed("relay"))  # where the gateway runs, too
        await server.wait_for_termination()
        placing.cancel()


def main() -> None:
    """Command line: ``--target`` the expert, ``--port`` to listen on."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the expert's host:port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run(serve(args.target, args.host, args.port))


if __name__ == "__main__":
    main()
