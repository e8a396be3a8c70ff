"""The one process module: a child in its own group but this session; stop with grace, then
the group and every descendant seen (one that left the group too)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from expertmesh import procs

#: A child that ignores SIGTERM and starts a grandchild in a process group of its own.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], process_group=0)
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def test_a_child_gets_its_own_group_in_this_session() -> None:
    proc = procs.spawn([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert os.getpgid(proc.pid) == proc.pid
        assert os.getsid(proc.pid) == os.getsid(0)  # never start_new_session: one scheduling group
    finally:
        assert procs.stop(proc, grace=5) == -15  # SIGTERM was enough


def test_stop_kills_a_stubborn_child_and_a_descendant_that_left_the_group() -> None:
    proc = procs.spawn([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    grandchild = psutil.Process(int(proc.stdout.readline()))
    assert os.getpgid(grandchild.pid) != proc.pid  # out of the child's group
    assert procs.stop(proc, grace=0.5) == -9  # SIGTERM ignored: killed after the grace
    proc.stdout.close()
    grandchild.wait(10)
    assert not grandchild.is_running()


async def test_wait_serving_gives_up_on_nothing_listening() -> None:
    assert not await procs.wait_serving(f"127.0.0.1:{procs.free_port()}", timeout=0.5)
