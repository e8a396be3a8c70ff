"""`expertmesh up` stopping while it restarts a child: the process being started is still
ended (it was lost when the stop cancelled the restart half-way through its spawn)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from expertmesh import procs
from expertmesh.config import load_config
from expertmesh.supervisor import Supervisor

from ..support import write_config


async def test_stop_during_a_spawn_ends_the_process_being_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path / "mesh.yaml", [{"expert_id": "g", "domain": "general", "model_path": "/m/g"}]
    )
    sup = Supervisor(load_config(path), path, tmp_path / "logs", lambda line: None)
    (child,) = sup.experts
    child.argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    started: list[asyncio.subprocess.Process] = []
    spawn = procs.spawn_async

    async def forked_then_slow(argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
        proc = await spawn(argv, **kw)
        started.append(proc)
        await asyncio.sleep(5)  # the process runs; its spawn has not returned yet
        return proc

    monkeypatch.setattr(procs, "spawn_async", forked_then_slow)
    child.tasks = [asyncio.create_task(sup._spawn(child))]  # as a restart by _keepalive
    while not started:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(sup.stop(), 10)
    (proc,) = started
    assert child.proc is proc
    assert proc.returncode is not None, "the process started during the stop is still running"
