"""Walks of process trees: the engine's processes (to stop them all) and their memory."""

from __future__ import annotations

import contextlib

import psutil


def descendants() -> list[psutil.Process]:
    """This process's descendants now (to tell which of them an engine started).

    multiprocessing's resource tracker, started with the first engine and kept for the life
    of the process, is left out: it is not the engine's and never exits on its own.
    """
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(proc.cmdline()):
                    found.append(proc)
    return found


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of a process and all its descendants (vLLM's engine core and workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # exited while we looked
            total += proc.memory_info().rss
    return total
