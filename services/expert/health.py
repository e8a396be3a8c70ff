"""grpc.health.v1 statuses of an expert, derived from its lifecycle state.

- ``""`` and ``expertmesh.v1.Expert``: SERVING whenever a request can be accepted: the engine
  is READY, or it loads on demand (a lazy expert, or one that was unloaded) and is COLD or
  LOADING. NOT_SERVING during an eager expert's first load, when FAILED, UNLOADING, or
  shutting down.
- ``expertmesh.v1.Expert/engine``: SERVING only while the engine is READY (warm), so that the
  gateway can tell a cold lazy expert from a warm one.
"""

from __future__ import annotations

import asyncio

import grpc

from expertmesh.contract import ENGINE_SERVICE, EXPERT_SERVICE
from expertmesh.rpc import NOT_SERVING, SERVING, Health

from .lifecycle import COLD, LOADING, READY, Lifecycle


class ExpertHealth:
    """Keeps the health servicer in step with a :class:`Lifecycle`."""

    def __init__(self, server: grpc.aio.Server, life: Lifecycle) -> None:
        self.health = Health(server, [EXPERT_SERVICE])
        self.life = life
        self.shutting_down = False
        self._pending: set[asyncio.Task[None]] = set()
        life.on_change(self._changed)

    def statuses(self) -> tuple[bool, bool]:
        """(accepting requests, engine ready) as things stand now."""
        if self.shutting_down:
            return False, False
        state = self.life.state
        ready = state == READY
        return ready or (state in (COLD, LOADING) and self.life.on_demand), ready

    async def apply(self) -> None:
        """Publish the current statuses."""
        accepting, ready = self.statuses()
        await self.health.set(accepting)
        await self.health.servicer.set(ENGINE_SERVICE, SERVING if ready else NOT_SERVING)

    def _changed(self) -> None:
        # apply() reads the state when it runs, so tasks finishing out of order still publish
        # the latest state.
        task = asyncio.get_running_loop().create_task(self.apply())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def shutdown(self) -> None:
        """NOT_SERVING everywhere from now on; every health Watch stream ends."""
        self.shutting_down = True
        await self.apply()
        await self.health.close()
