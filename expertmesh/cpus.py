"""Keep serving threads, and vLLM's engine core, off the cores vLLM's CPU workers compute on.

vLLM's CPU backend binds each worker's OpenMP threads to all allowed cores but a reserved few
(one per worker on x86 and ARM), meant for the engine core and the server. Nothing keeps those
there: the kernel is free to run a server's or the engine core's threads on a worker's core,
and every slice they take there stalls the worker (on two cores, measured: the worker got
0.82-0.97 of its core instead of 0.98). :func:`place` narrows the calling process (and an
engine core) to the cores no worker on this host is bound to. Where no worker is bound (GPU,
``VLLM_CPU_OMP_THREADS_BIND=nobind``, or none visible, as in a pod of its own) it leaves the
process on every core it was started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

import psutil

log = logging.getLogger(__name__)

#: The CPUs this process may use, read before anything here narrows them.
ALLOWED: frozenset[int] = frozenset(os.sched_getaffinity(0))
#: How often a process beside engines that come and go (the gateway) places itself again.
PLACE_EVERY_S = 5.0


def vllm_role(proc: psutil.Process) -> str:
    """``EngineCore``, ``Worker...``: the title vLLM gives its processes; "" for any other."""
    with contextlib.suppress(psutil.Error):
        cmd = proc.cmdline()
        if cmd and cmd[0].startswith("VLLM::"):
            return cmd[0].removeprefix("VLLM::")
    return ""


def worker_cores() -> frozenset[int]:
    """The cores vLLM workers visible from here are bound to (all of them when unbound)."""
    bound: set[int] = set()
    for proc in psutil.process_iter():
        if vllm_role(proc).startswith("Worker"):
            with contextlib.suppress(psutil.Error):
                bound.update(proc.cpu_affinity())
    return frozenset(bound)


def _pin(proc: psutil.Process, cpus: frozenset[int]) -> None:
    """Every thread of ``proc``: Linux keeps an affinity per thread, and new ones inherit it."""
    with contextlib.suppress(psutil.Error):
        for thread in proc.threads():
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                if os.sched_getaffinity(thread.id) != cpus:
                    os.sched_setaffinity(thread.id, cpus)


def widen_this_thread() -> None:
    """Give the calling thread all of :data:`ALLOWED` again.

    A process started from it inherits its affinity, and vLLM chooses its worker's cores from
    that: a new engine must see every core, not only those an earlier one left free.
    """
    os.sched_setaffinity(0, ALLOWED)


def place(engine_procs: Iterable[psutil.Process] = ()) -> frozenset[int] | None:
    """Move this process, and the engine cores among ``engine_procs``, off the workers' cores.

    Returns the cores they now run on, or None when no worker is bound to a strict subset of
    :data:`ALLOWED` (then this process gets all of :data:`ALLOWED`).
    """
    free = ALLOWED - worker_cores()
    placed = free if free and free != ALLOWED else None
    _pin(psutil.Process(), placed or ALLOWED)
    if placed:
        for proc in engine_procs:
            if vllm_role(proc) == "EngineCore":
                _pin(proc, placed)
    return placed


async def keep_placed(name: str, every_s: float = PLACE_EVERY_S) -> None:
    """:func:`place` this process every ``every_s`` seconds, as experts load and unload."""
    last: frozenset[int] | None = None
    while True:
        placed = await asyncio.to_thread(place)
        if placed != last:
            where = f"cores {sorted(placed)}, off vLLM's workers" if placed else "every core"
            log.info("%s runs on %s", name, where)
            last = placed
        await asyncio.sleep(every_s)
