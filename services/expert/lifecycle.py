"""The expert's engine as an explicit state machine.

::

    COLD ──load──▶ LOADING ──built──▶ READY ──unload──▶ UNLOADING ──▶ COLD
                     │  └─memory budget refused─▶ COLD        │
                     └─build failed─▶ FAILED ◀──engine died───┘

FAILED is final for the process: the real error text is kept and returned to every caller
(ModelMesh-style) until the process is restarted. Transitions happen on the event loop and
each one is checked against :data:`TRANSITIONS`; listeners (health) are told after each.
Building and shutting down the engine run in threads, in tasks that callers await through
``asyncio.shield``, so a caller whose deadline expires never cancels a load halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil

from expertmesh import cpus
from expertmesh.config import ExpertConfig
from expertmesh.errors import FailedPrecondition, Unavailable
from expertmesh.loop import freeze_heap, thaw_heap
from expertmesh.telemetry import traced_load
from expertmesh.v1 import expertmesh_pb2 as pb

from .engine import build_engine, shutdown_engine
from .ipc_dir import IpcDir
from .output_tail import OutputTail, root_cause
from .proctree import descendants, tree_rss

if TYPE_CHECKING:  # vLLM is imported with the first load
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

COLD = pb.EXPERT_STATE_COLD
LOADING = pb.EXPERT_STATE_LOADING
READY = pb.EXPERT_STATE_READY
FAILED = pb.EXPERT_STATE_FAILED
UNLOADING = pb.EXPERT_STATE_UNLOADING
TRANSITIONS: dict[int, frozenset[int]] = {
    COLD: frozenset({LOADING}),
    LOADING: frozenset({READY, FAILED, COLD}),
    READY: frozenset({UNLOADING, FAILED}),
    UNLOADING: frozenset({COLD, FAILED}),
    FAILED: frozenset(),
}
#: Time for the output tee to take in what the engine processes printed before they exited.
STDERR_SETTLE_S = 0.3
MAX_ERROR_CHARS = 2000

BeforeLoad = Callable[["Lifecycle"], Awaitable[None]]


def state_name(state: int) -> str:
    """``READY`` for EXPERT_STATE_READY, and so on."""
    return pb.ExpertState.Name(state).removeprefix("EXPERT_STATE_")  # type: ignore[arg-type]


class Lifecycle:
    """Owns the engine of one expert: its state, loads, unloads, use and failure."""

    def __init__(
        self,
        cfg: ExpertConfig,
        *,
        before_load: BeforeLoad | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
        output: OutputTail | None = None,
        ipc: IpcDir | None = None,
    ) -> None:
        self.cfg = cfg
        self.state: int = COLD
        self.engine: AsyncLLM | None = None
        self.load_count = 0
        self.load_seconds = 0.0
        self.last_error = ""
        self.unload_reason = ""
        self.in_flight = 0
        self.closing = False
        self.max_model_len: int | None = cfg.max_model_len
        self.load_growth_bytes: int | None = None  # measured RSS growth of the last load
        self._last_used = time.monotonic()
        #: the engine's last sign of life for the stall watchdog: an output, or a request
        #: admitted while it held none
        self.progress_at = time.monotonic()
        self._load_started = 0.0
        self._task: asyncio.Task[None] | None = None
        self._engine_procs: list[psutil.Process] = []  # the processes the engine started
        self._listeners: list[Callable[[], None]] = []
        self._before_load = before_load
        self._prepare = prepare
        self._output = output
        self._ipc = ipc

    # -- observation -----------------------------------------------------------------------

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every state change."""
        self._listeners.append(listener)

    @property
    def on_demand(self) -> bool:
        """Whether a request may arrive while COLD/LOADING (it then waits for the load)."""
        return self.cfg.load == "lazy" or self.load_count > 0

    @property
    def idle_seconds(self) -> float:
        """Time since the last request ended; 0 while one is in flight."""
        return 0.0 if self.in_flight else time.monotonic() - self._last_used

    def idle_unload_due(self) -> bool:
        """True when the engine has been idle for ``idle_unload_after_s``."""
        limit = self.cfg.idle_unload_after_s
        return limit is not None and self.state == READY and not self.in_flight and self.idle_seconds >= limit

    def failure(self) -> str:
        """The message a caller gets from a FAILED expert."""
        return f"expert {self.cfg.expert_id} is FAILED: {self.last_error}"

    def _set(self, state: int) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(
                f"illegal expert state transition {state_name(self.state)} -> {state_name(state)}"
            )
        log.info("expert %s: %s -> %s", self.cfg.expert_id, state_name(self.state), state_name(state))
        self.state = state
        for listener in self._listeners:
            listener()

    # -- use ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Count a request in flight: an engine in use is never unloaded."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._last_used = time.monotonic()

    async def ensure_ready(self, *, wait_initial: bool = False) -> Any:
        """The READY engine; starts the load if COLD and waits for it (the caller's deadline bounds it).

        During an eager expert's first load (health NOT_SERVING) callers get UNAVAILABLE at once,
        unless ``wait_initial`` (Load with wait=true).
        """
        while True:
            self.check_engine()
            if self.state == READY:
                return self.engine
            if self.state == FAILED:
                raise Unavailable(self.failure())
            if self.closing:
                raise Unavailable(f"expert {self.cfg.expert_id} is shutting down")
            if self.state == LOADING and not self.on_demand and not wait_initial:
                since = time.monotonic() - self._load_started
                raise Unavailable(
                    f"expert {self.cfg.expert_id} is LOADING (started {since:.0f} s ago); "
                    f"retry later or on another expert"
                )
            if self.state == COLD:
                self.start_load()
            assert self._task is not None
            await asyncio.shield(self._task)  # a refused load raises its cause here

    def stalled_for(self, now: float | None = None) -> float | None:
        """Seconds the engine has held requests without any output, once past ``stall_timeout_s``."""
        limit = self.cfg.stall_timeout_s
        if limit is None or self.state != READY or self.engine is None:
            return None
        if not self.engine.get_num_unfinished_requests():
            return None
        quiet = (time.monotonic() if now is None else now) - self.progress_at
        return quiet if quiet > limit else None

    def fail_stalled(self, quiet_s: float) -> None:
        """The engine stopped making progress: FAILED with that cause, and its processes killed,
        so that every stream waiting on it ends at once (UNAVAILABLE, naming the stall)."""
        waiting = self.engine.get_num_unfinished_requests() if self.engine is not None else 0
        self.last_error = (
            f"engine stalled: no output for {quiet_s:.1f} s with {waiting} requests waiting "
            f"(stall_timeout_s={self.cfg.stall_timeout_s:g})"
        )
        self._set(FAILED)
        for proc in self._engine_procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def check_engine(self) -> bool:
        """True once the loaded engine has died; the expert is then FAILED with the cause."""
        if self.engine is not None and self.state == READY and self.engine.errored:
            err = self.engine.dead_error
            self.last_error = f"engine died: {type(err).__name__}: {err}"
            self._set(FAILED)
        return self.state == FAILED and self.engine is not None

    # -- load --------------------------------------------------------------------------------

    def start_load(self, *, on_demand: bool = True) -> None:
        """COLD -> LOADING, in the background; nothing in any other state.

        ``on_demand`` loads (lazy, reloads) first make room under the mesh memory budget.
        """
        if self.state != COLD or self.closing:
            return
        self._set(LOADING)
        self._load_started = time.monotonic()
        self._task = asyncio.create_task(self._load(on_demand))
        self._task.add_done_callback(_log_refusal)

    async def _load(self, on_demand: bool) -> None:
        try:
            if on_demand and self._before_load is not None:
                await self._before_load(self)
            if self._prepare is not None:
                await self._prepare()
        except BaseException:
            self._set(COLD)
            raise
        mark = self._output.position if self._output else 0
        rss_before = tree_rss()
        known = {p.pid for p in descendants()}
        started = time.monotonic()
        try:
            engine = await self._build()
        except Exception as e:
            self.last_error = await self._explain(e, mark)
            log.error(
                "expert %s failed to load %s: %s", self.cfg.expert_id, self.cfg.model_path, self.last_error
            )
            self._set(FAILED)
            return
        self.engine = engine
        self._engine_procs = [p for p in descendants() if p.pid not in known]
        if self.cfg.reserved_cores:
            cores = cpus.place(self._engine_procs)
            if cores is not None:
                log.info("expert %s and its engine core run on cores %s", self.cfg.expert_id, sorted(cores))
        self.load_seconds = time.monotonic() - started
        self.load_count += 1
        self.max_model_len = int(engine.model_config.max_model_len)
        self.load_growth_bytes = max(tree_rss() - rss_before, 0)
        self._last_used = time.monotonic()  # the idle clock starts now
        log.info("expert %s loaded %s in %.1f s", self.cfg.expert_id, self.cfg.model_path, self.load_seconds)
        freeze_heap()  # what the load left is skipped by every later full collection
        self._set(READY)

    @traced_load
    async def _build(self) -> Any:
        engine = await asyncio.to_thread(build_engine, self.cfg)
        try:
            # vLLM asks its engine process this on the first request and caches the answer. Ask
            # now: an engine that dies leaves that question unanswered, and the request waiting
            # on it would hang instead of failing with the cause.
            await engine.get_supported_tasks()
        except BaseException:
            engine.shutdown()
            raise
        return engine

    async def _explain(self, exc: Exception, mark: int) -> str:
        """The error text to keep: the engine processes' first exception, then what vLLM raised."""
        text = f"{type(exc).__name__}: {exc}"
        if self._output is not None:
            await asyncio.sleep(STDERR_SETTLE_S)
            cause = root_cause(self._output.since(mark))
            if cause and cause not in text:
                text = f"{cause} (vLLM: {text})"
        return text[:MAX_ERROR_CHARS]

    # -- unload ------------------------------------------------------------------------------

    def request_unload(self, reason: str) -> asyncio.Task[None] | None:
        """READY -> UNLOADING -> COLD in the background; the task to await, None if nothing to do."""
        if self.state in (COLD, FAILED):
            return None
        if self.state == UNLOADING:
            return self._task
        if self.state == LOADING:
            raise FailedPrecondition(f"expert {self.cfg.expert_id} is LOADING; it can be unloaded once READY")
        if self.in_flight:
            raise FailedPrecondition(
                f"expert {self.cfg.expert_id} has {self.in_flight} requests in flight; not unloading"
            )
        # Synchronously, so that no request can pick up the engine between this check and the unload.
        self._set(UNLOADING)
        engine, self.engine = self.engine, None
        self._task = asyncio.create_task(self._unload(engine, reason))
        return self._task

    async def _unload(self, engine: AsyncLLM | None, reason: str) -> None:
        started = time.monotonic()
        try:
            if engine is not None:  # READY has one
                await asyncio.to_thread(shutdown_engine, engine, self._engine_procs)
            if self._ipc is not None:  # the engine's processes are gone: so are their sockets' users
                self._ipc.clear()
            thaw_heap()  # the old engine's cycles can be collected now; the next load freezes anew
        except Exception:
            log.exception("expert %s: engine shutdown failed", self.cfg.expert_id)
        self.unload_reason = reason
        log.info(
            "expert %s released its engine in %.1f s: %s",
            self.cfg.expert_id,
            time.monotonic() - started,
            reason,
        )
        self._set(COLD)

    async def close(self, timeout: float) -> None:
        """Process shutdown: let a running load or unload finish (up to ``timeout``), stop the engine."""
        self.closing = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        engine, self.engine = self.engine, None
        if engine is not None:
            if self.state == READY:
                self._set(UNLOADING)
            # No waiting for the engine processes to be gone: the process is ending, and whoever
            # stops it (the supervisor) takes care of a straggler after the grace period.
            await asyncio.to_thread(shutdown_engine, engine, [])
            if self.state == UNLOADING:
                self._set(COLD)


def _log_refusal(task: asyncio.Task[None]) -> None:
    # A load nobody awaited (Load with wait=false) may be refused by the memory budget; say so.
    if not task.cancelled() and task.exception() is not None:
        log.warning("load not started: %s", task.exception())
