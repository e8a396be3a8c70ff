"""Placing a server's threads off vLLM's worker cores, with stand-in vLLM processes.

``place`` narrows the calling process, so each case runs it in a child Python process; the
"engine" is two ``sleep`` processes titled as vLLM titles its own (``VLLM::EngineCore``,
``VLLM::Worker``). Real engines: test_expert_lifecycle.py and test_mesh.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

ALLOWED = frozenset(os.sched_getaffinity(0))

PLACE = """
import json, os, sys, threading, psutil
from expertmesh import cpus
stop = threading.Event()
extra = threading.Thread(target=stop.wait)  # a thread that exists before the placement
extra.start()
placed = cpus.place([psutil.Process(int(p)) for p in sys.argv[1:]])
cores = sorted({c for t in psutil.Process().threads() for c in os.sched_getaffinity(t.id)})
later = []
born_after = threading.Thread(target=lambda: later.extend(os.sched_getaffinity(0)))
born_after.start()
born_after.join()
stop.set()
extra.join()
cpus.widen_this_thread()
print(json.dumps({"placed": placed and sorted(placed), "threads": cores, "later": sorted(later),
                  "widened": sorted(os.sched_getaffinity(0))}))
"""


@pytest.fixture
def engine() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {
        role: subprocess.Popen(["bash", "-c", f"exec -a VLLM::{role} sleep 60"])
        for role in ("EngineCore", "Worker")
    }
    yield procs
    for proc in procs.values():
        proc.kill()
        proc.wait()


def _place(*pids: int) -> dict[str, list[int] | None]:
    out = subprocess.run([sys.executable, "-c", PLACE, *map(str, pids)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result: dict[str, list[int] | None] = json.loads(out.stdout)
    return result


Engine = dict[str, subprocess.Popen[bytes]]


def test_the_server_and_engine_core_leave_the_workers_cores(engine: Engine) -> None:
    assert len(ALLOWED) >= 2, "this needs a machine with two cores or more"
    worker_core = min(ALLOWED)
    os.sched_setaffinity(engine["Worker"].pid, {worker_core})  # as vLLM binds its worker
    free = sorted(ALLOWED - {worker_core})
    result = _place(engine["EngineCore"].pid, engine["Worker"].pid)
    assert result == {"placed": free, "threads": free, "later": free, "widened": sorted(ALLOWED)}
    assert sorted(os.sched_getaffinity(engine["EngineCore"].pid)) == free
    assert os.sched_getaffinity(engine["Worker"].pid) == {worker_core}  # the worker is vLLM's to bind


def test_an_unbound_worker_leaves_everything_as_it_is(engine: Engine) -> None:
    result = _place(engine["EngineCore"].pid, engine["Worker"].pid)  # a worker on every core
    assert result["placed"] is None
    assert result["threads"] == result["later"] == sorted(ALLOWED)
    assert os.sched_getaffinity(engine["EngineCore"].pid) == ALLOWED
