"""Start the scenario groups, measure their scenarios in turns, stop them.

A full run starts every group at once and takes every trial of every scenario in turn, so
that all the ratios come from trials seconds apart (five engines). A quick run
measures one group after the other and starts the next one while one is measured (at most
three engines alive).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from .context import Context, Group, Results, Turn
from .load import BenchError
from .mesh_groups import MeshGroup, SecureGroup
from .prefix import PrefixGroup
from .topology import AloneGroup, UpGroup
from .vllm_groups import VllmGrpcGroup, VllmOpenAIGroup

GROUPS: tuple[type[Group], ...] = (
    MeshGroup,
    SecureGroup,
    UpGroup,
    AloneGroup,
    PrefixGroup,
    VllmGrpcGroup,
    VllmOpenAIGroup,
)


async def run_groups(ctx: Context, together: bool, groups: tuple[type[Group], ...] = GROUPS) -> Results:
    """Measure every group, all of them ``together`` (in turns) or one after the other.

    One after the other, the next group starts while one is measured. A group that fails is
    recorded under ``errors`` for its scenarios and the others still run. Every group that was
    started is stopped, whatever happens (cancellation included).
    """
    made = [g(ctx) for g in groups]
    batches = [made] if together else [[g] for g in made]
    starts: dict[Group, asyncio.Task[None]] = {}
    stopped: set[Group] = set()
    ahead = 0 if together else 1

    def begin(index: int) -> None:
        for group in batches[index] if index < len(batches) else ():
            if group not in starts:
                starts[group] = asyncio.create_task(group.start())

    try:
        for index in range(ahead + 1):
            begin(index)
        for index, batch in enumerate(batches):
            begin(index)
            try:
                ready = []
                for group in batch:
                    try:
                        await starts[group]
                    except Exception as e:  # one group's failure is reported; the others still run
                        _fail(ctx, group, e)
                    else:
                        ready.append(group)
                await take_turns(ctx, ready)
            finally:
                for group in batch:
                    stopped.add(group)
                    await group.stop()
            begin(index + ahead + 1)
    finally:
        for group, task in starts.items():
            if group not in stopped:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                await group.stop()
    return ctx.results


async def take_turns(ctx: Context, groups: list[Group]) -> None:
    """Warm every group's scenarios up, then measure each (level, trial) in every scenario in turn."""
    failed: set[Group] = set()
    async with contextlib.AsyncExitStack() as stack:
        turns: list[tuple[Group, Turn]] = []
        for group in groups:
            try:
                turns += [(group, turn) for turn in await group.turns(stack)]
            except Exception as e:
                _fail(ctx, group, e)
        for concurrency, _ in ctx.plan.levels():
            for group, turn in turns:
                if group in failed:
                    continue
                try:
                    await turn.trial(concurrency)
                except Exception as e:
                    _fail(ctx, group, e, f" in {turn.name} at {concurrency} streams")
                    failed.add(group)


def _fail(ctx: Context, group: Group, e: Exception, where: str = "") -> None:
    message = _describe(e) + where
    ctx.say(f"{'/'.join(group.names)} FAILED: {message}")
    for name in group.names:
        ctx.results.errors[name] = message


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    if isinstance(e, ImportError):
        return f"{e} (vLLM's gRPC server needs smg-grpc-servicer and smg-grpc-proto, installed --no-deps)"
    if isinstance(e, BenchError):
        return str(e)
    return f"{type(e).__name__}: {e}"
