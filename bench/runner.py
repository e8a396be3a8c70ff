"""Run the scenario groups in order, one at a time or overlapped (quick runs)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from .load import BenchError
from .scenarios import Context, Group, MeshGroup, Results, VllmGrpcGroup, VllmOpenAIGroup

GROUPS: tuple[type[Group], ...] = (MeshGroup, VllmGrpcGroup, VllmOpenAIGroup)


async def run_groups(ctx: Context, overlap: bool, groups: tuple[type[Group], ...] = GROUPS) -> Results:
    """Run the groups in order; with ``overlap`` the next group starts while one is measured.

    A group that fails is recorded under ``errors`` for its scenarios and the others still run.
    Every group that was started is stopped, whatever happens (cancellation included).
    """
    made = [g(ctx) for g in groups]
    starts: dict[int, asyncio.Task[None]] = {}
    stopped: set[int] = set()
    ahead = 1 if overlap else 0

    def begin(i: int) -> None:
        if i < len(made) and i not in starts:
            starts[i] = asyncio.create_task(made[i].start())

    try:
        for i in range(ahead + 1):
            begin(i)
        for i, group in enumerate(made):
            begin(i)
            try:
                await starts[i]
                await group.measure()
            except Exception as e:  # one group's failure is reported; the others still run
                message = _describe(e)
                ctx.say(f"{'/'.join(group.names)} FAILED: {message}")
                for name in group.names:
                    ctx.results.errors[name] = message
            finally:
                stopped.add(i)
                await group.stop()
            begin(i + ahead + 1)
    finally:
        for i, task in starts.items():
            if i not in stopped:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                await made[i].stop()
    return ctx.results


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, ImportError):
        return f"{e} (vLLM's gRPC server needs smg-grpc-servicer and smg-grpc-proto, installed --no-deps)"
    if isinstance(e, BenchError):
        return str(e)
    return f"{type(e).__name__}: {e}"
