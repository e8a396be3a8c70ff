"""Unit tests of the expert lifecycle state machine, with a stand-in engine (no vLLM).

The real engines are exercised by test_expert_lifecycle.py and test_expert_errors.py; here the
transitions, the use counting and the failure texts are checked quickly and exactly.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from expertmesh.config import ExpertConfig
from expertmesh.errors import MeshError, ResourceExhausted, status_for
from expertmesh.services.expert import ipc_dir
from expertmesh.services.expert import lifecycle as lc
from expertmesh.services.expert.ipc_dir import IpcDir
from expertmesh.services.expert.lifecycle import COLD, FAILED, LOADING, READY, Lifecycle
from expertmesh.services.expert.output_tail import OutputTail, root_cause


class FakeEngine:
    """What the lifecycle uses of AsyncLLM."""

    class model_config:  # mirrors vLLM's attribute name
        max_model_len = 512

    def __init__(self) -> None:
        self.errored = False
        self.dead_error: BaseException = RuntimeError("EngineCore died")
        self.shut_down = False

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def shutdown(self) -> None:
        self.shut_down = True


def _cfg(**extra: Any) -> ExpertConfig:
    # No core placement: a stand-in engine starts no processes, so the test's own children
    # (other tests' engines) would be taken for this one's.
    return ExpertConfig(expert_id="e", domain="d", model_path="/nowhere", reserved_cores=False, **extra)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """build_engine blocks until the test sets the returned event."""
    release = threading.Event()

    def build(cfg: ExpertConfig) -> FakeEngine:
        assert release.wait(10)
        return FakeEngine()

    monkeypatch.setattr(lc, "build_engine", build)
    return release


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """A load freezes this (the test) process's heap; leave it as the test found it."""
    yield
    gc.unfreeze()


async def test_lazy_load_on_demand_then_unload(gate: threading.Event) -> None:
    life = Lifecycle(_cfg(load="lazy"))
    seen: list[int] = []
    life.on_change(lambda: seen.append(life.state))
    assert (life.state, life.on_demand) == (COLD, True)
    with life.use():
        waiter = asyncio.create_task(life.ensure_ready())
        await asyncio.sleep(0.05)
        assert life.state == LOADING
        gate.set()
        engine = await waiter
    assert life.state == READY and life.load_count == 1 and life.max_model_len == 512
    # What the load left (torch, vLLM) is frozen, so that full collections skip it.
    assert gc.get_freeze_count() > 0
    with life.use(), pytest.raises(MeshError) as err:
        life.request_unload("test")
    assert status_for(err.value) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "expert e has 1 requests in flight; not unloading",
    )
    task = life.request_unload("test")
    assert task is not None and life.state == lc.UNLOADING and life.engine is None
    await task
    assert (life.state, life.unload_reason, engine.shut_down) == (COLD, "test", True)
    assert gc.get_freeze_count() == 0  # the old engine's cycles can be collected
    assert seen == [LOADING, READY, lc.UNLOADING, COLD]


async def test_an_unload_clears_the_sockets_the_engine_left(gate: threading.Event, tmp_path: Path) -> None:
    ipc = IpcDir(tmp_path)
    life = Lifecycle(_cfg(), ipc=ipc)
    gate.set()
    await life.ensure_ready()
    (tmp_path / "left-by-the-engine").touch()  # what vLLM's processes leave on exit
    task = life.request_unload("test")
    assert task is not None
    await task
    assert (life.state, list(tmp_path.iterdir())) == (COLD, [])
    ipc.remove()
    assert not tmp_path.exists()


def test_ipc_dir_is_claimed_once_and_never_over_the_operators_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ipc_dir.ENV, raising=False)
    monkeypatch.setenv(ipc_dir.TMPDIR, tempfile.gettempdir())  # restored after the test
    own_tmp = tempfile.gettempdir()
    ours = IpcDir.claim()
    try:
        assert ours.path is not None and ours.path.is_dir()
        assert ours.path.name.startswith(f"{ipc_dir.PREFIX}{os.getpid()}-")
        assert os.environ[ipc_dir.ENV] == str(ours.path)  # read by vLLM, inherited by its processes
        assert os.environ[ipc_dir.TMPDIR] == str(ours.path)  # the engine processes' temp dir ...
        assert tempfile.gettempdir() == own_tmp  # ... not this process's
        again = IpcDir.claim()  # set now, as an operator's setting would be: left alone
        assert again.path is None
        again.clear()
        again.remove()
        assert ours.path.is_dir()
    finally:
        ours.remove()
        os.environ.pop(ipc_dir.ENV, None)  # it names a removed directory now
    assert not ours.path.exists()


async def test_a_deadline_while_waiting_does_not_cancel_the_load(gate: threading.Event) -> None:
    life = Lifecycle(_cfg(load="lazy"))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(life.ensure_ready(), 0.1)
    assert life.state == LOADING
    gate.set()
    await life.ensure_ready()
    assert life.state == READY


async def test_failed_load_keeps_the_root_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    tail = OutputTail()

    def build(cfg: ExpertConfig) -> None:
        worker = "(Worker pid=7) ERROR 11-24 02:10:52 [multiproc_executor.py:953] "
        tail.add(worker + "WorkerProc failed to start.")
        tail.add(worker + "Traceback (most recent call last):")
        tail.add(worker + '  File "x.py", line 1, in f')
        tail.add(
            worker + "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: "
            "incomplete metadata"
        )
        tail.add("Traceback (most recent call last):")
        tail.add("Exception: WorkerProc initialization failed due to an exception in a background process.")
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(lc, "build_engine", build)
    life = Lifecycle(_cfg(), output=tail)
    life.start_load(on_demand=False)
    with pytest.raises(MeshError) as err:
        await life.ensure_ready(wait_initial=True)
    expected = (
        "safetensors._safetensors_rust.SafetensorError: Error while deserializing header: "
        "incomplete metadata (vLLM: RuntimeError: Engine core initialization failed. See root cause above.)"
    )
    assert (life.state, life.last_error) == (FAILED, expected)
    assert status_for(err.value) == (grpc.StatusCode.UNAVAILABLE, f"expert e is FAILED: {expected}")
    assert life.request_unload("x") is None  # nothing to release; FAILED stays FAILED


async def test_callers_do_not_wait_for_an_eager_first_load(gate: threading.Event) -> None:
    life = Lifecycle(_cfg())  # eager: NOT_SERVING while it loads, so callers are told to go elsewhere
    life.start_load(on_demand=False)
    with pytest.raises(MeshError) as err:
        await life.ensure_ready()
    assert status_for(err.value) == (
        grpc.StatusCode.UNAVAILABLE,
        "expert e is LOADING (started 0 s ago); retry later or on another expert",
    )
    gate.set()
    await life.ensure_ready(wait_initial=True)  # Load(wait=true) waits
    assert life.state == READY and life.on_demand  # once loaded, a reload is waited for


async def test_budget_refusal_returns_to_cold(gate: threading.Event) -> None:
    async def refuse(life: Lifecycle) -> None:
        raise ResourceExhausted("memory budget 1.0 GiB: no idle expert is left to unload")

    life = Lifecycle(_cfg(load="lazy"), before_load=refuse)
    with pytest.raises(ResourceExhausted):
        await life.ensure_ready()
    assert life.state == COLD and life.load_count == 0


async def test_engine_death_fails_the_expert(gate: threading.Event) -> None:
    gate.set()
    life = Lifecycle(_cfg(idle_unload_after_s=0.01))
    life.start_load(on_demand=False)
    engine = await life.ensure_ready(wait_initial=True)
    await asyncio.sleep(0.02)
    assert life.idle_unload_due()
    engine.errored = True
    assert life.check_engine()
    assert (life.state, life.last_error) == (FAILED, "engine died: RuntimeError: EngineCore died")
    await life.close(1)
    assert engine.shut_down and life.state == FAILED


def test_illegal_transitions_are_refused() -> None:
    life = Lifecycle(_cfg())
    with pytest.raises(RuntimeError, match="illegal expert state transition COLD -> READY"):
        life._set(READY)


def test_root_cause_picks_the_first_exception_of_a_traceback() -> None:
    lines = [
        "INFO something: Error rate 0",  # not in a traceback
        "Traceback (most recent call last):",
        '  File "a.py", line 3, in <module>',
        "    raise KeyError('x')",
        "KeyError: 'x'",
        "Traceback (most recent call last):",
        "RuntimeError: later",
    ]
    assert root_cause(lines) == "KeyError: 'x'"
    assert root_cause(["no traceback here"]) is None


def test_output_tail_sees_what_child_processes_print() -> None:
    """The tee passes everything through and keeps what children (like vLLM's) write to fd 1 and 2."""
    program = textwrap.dedent(
        """
        import subprocess, sys
        from expertmesh.services.expert.output_tail import OutputTail, root_cause
        tail = OutputTail().install()
        mark = tail.position
        print("parent line", flush=True)
        child = "import sys; print('child out'); raise KeyError('weights.bin')"
        subprocess.run([sys.executable, "-c", child])
        tail.close()
        print("CAUSE", root_cause(tail.since(mark)))
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "parent line\nchild out\n" in done.stdout
    assert "KeyError: 'weights.bin'" in done.stderr  # passed through unchanged
    assert done.stdout.endswith("CAUSE KeyError: 'weights.bin'\n")
