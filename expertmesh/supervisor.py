"""``expertmesh up``: start the gateway and one process per expert, watch them, stop them cleanly.

Each child runs in its own process group, so that stopping it reaches vLLM's engine-core and
worker processes too, but in the supervisor's session: with the kernel's autogroup scheduling
a session is a scheduling group, and an expert in a session of its own was starved by its own
engine processes (on 2 cores: half the throughput, streams stalled up to a second). The
session's scheduling group gets a positive nice (``session_nice``), so that a client in another
session (another terminal) is not starved by the same engines (:mod:`expertmesh.autogroup`).

An expert whose model fails to load stays up in state FAILED (its process keeps answering
Info with the cause); the supervisor reads that cause as soon as the expert reports it and
says it, so that a failed load is never silent.

Stop order: SIGTERM to the gateway first (it stops taking requests and lets its streams
finish), then to the experts (each turns NOT_SERVING, drains and shuts its engine down), all
within one grace period; SIGKILL to any group or recorded descendant still alive when it is
over: no orphans. A process that dies is restarted with exponential backoff up to
``max_restarts``; one that served and then answers no health check for
``unresponsive_restart_s`` (hung, or SIGSTOPped) is killed and restarted the same way.

Reload (SIGHUP): the config file is read and validated again (an invalid one is refused and
nothing changes); the gateway re-reads it (SIGHUP); experts removed from it are stopped with
grace (each turns NOT_SERVING at once, so the gateway routes past it, and finishes its streams);
new experts are started as at start; an expert whose settings changed is stopped and started
again with them (:mod:`expertmesh.reconcile`); the others keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh import autogroup, procs
from expertmesh.child import Child, alive, kill_group, signal_group
from expertmesh.config import ConfigError, MeshConfig, load_config
from expertmesh.reconcile import diff
from expertmesh.tls import TlsError, probe_channel
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
HEALTH_POLL_S = 0.25
#: Health checks in a row past their 1 s deadline before a process that answered before is
#: reported unreachable: on a small host an engine that loads keeps its server slow to answer.
LATE_CHECKS = 5
BACKOFF_MAX_S = 30.0
#: Health checks reconnect within a second: a child is polled from before it listens, and after
#: restarts, and gRPC's default backoff (up to two minutes) would hide it that long.
WATCH_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
#: A process that ran this long before exiting starts its restart count (and backoff) afresh.
STABLE_AFTER_S = 600.0


Report = Callable[[str], None]


class Supervisor:
    """Starts, watches and stops the processes of one mesh config."""

    def __init__(self, config: MeshConfig, config_path: Path, log_dir: Path, report: Report = print) -> None:
        self.config = config
        self.config_path = config_path
        self.report = report
        self.stopping = False
        self.log_dir = log_dir
        self._reloading = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.experts = [c for e in config.experts for c in self._expert_children(config, e.expert_id)]
        gw_host = "127.0.0.1" if config.gateway.host in ("0.0.0.0", "::") else config.gateway.host
        self.gateway = Child(
            "gateway",
            self._module_argv("expertmesh.gateway"),
            f"{gw_host}:{config.gateway.port}",
            log_dir / "gateway.log",
        )

    def _module_argv(self, module: str) -> list[str]:
        """``python -m MODULE --config FILE`` with this interpreter, as every child is started."""
        return [sys.executable, "-m", module, "--config", str(self.config_path)]

    def _expert_children(self, config: MeshConfig, expert_id: str) -> list[Child]:
        """The processes of one expert of ``config``: one per local replica."""
        index = next(i for i, e in enumerate(config.experts) if e.expert_id == expert_id)
        e = config.experts[index]
        argv = [*self._module_argv("expertmesh.services.expert"), "--expert-id", expert_id]
        children = []
        for r, address in enumerate(config.local_addresses(index)):
            # local_replicas: one process each, named and logged apart, restarted on its own
            name, log_name = (
                (f"{expert_id}#{r}", f"{expert_id}-{r}") if e.local_replicas > 1 else 2 * (expert_id,)
            )
            log_path = self.log_dir / f"{log_name}.log"
            argv_r = [*argv, "--replica", str(r)]
            children.append(Child(name, argv_r, address, log_path, is_expert=True, expert_id=expert_id))
        return children

    @property
    def children(self) -> list[Child]:
        """The gateway first, then the experts."""
        return [self.gateway, *self.experts]

    async def _spawn(self, child: Child) -> None:
        with child.log_path.open("ab") as out:
            spawning = asyncio.ensure_future(
                procs.spawn_async(
                    child.argv,
                    stdin=asyncio.subprocess.DEVNULL,  # a background group reading the terminal would stop
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            )
            try:
                child.proc = await asyncio.shield(spawning)
            except asyncio.CancelledError:
                # Stopping while it starts: keep the process, so that stop() can end it.
                child.proc = await spawning
                child.family = procs.Family(child.proc.pid)
                raise
        child.family = procs.Family(child.proc.pid)
        child.started_at = time.monotonic()
        child.health = "STARTING"
        child.ready_after_s = None
        child.failure = ""
        self.report(f"{child.name}: started (pid {child.proc.pid}, log {child.log_path})")

    async def preflight(self) -> int:
        """Run ``expertmesh check`` on the config (in a child, so vLLM's import stays out of
        this process) and report its findings; returns its exit code (1 = some expert has errors).

        An expert with errors is still started: it runs the same checks itself, does not load
        its engine, and reports FAILED with the findings through Info and ListExperts.
        """
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "expertmesh.cli",
            "check",
            "--config",
            str(self.config_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()  # stopping before it finished: leave nothing behind
            await proc.wait()
            raise
        code = proc.returncode or 0
        summary = "no errors" if code == 0 else "errors found; those experts stay FAILED"
        self.report(f"preflight ({summary}):\n{out.decode(errors='replace').rstrip()}")
        return code

    async def start(self) -> None:
        """Start every process and the tasks that watch them."""
        # Before the children start: they share this session's scheduling group (autogroup.py).
        self.report(autogroup.lower_session_weight(self.config.session_nice))
        for child in self.children:
            await self._launch(child)

    async def _launch(self, child: Child) -> None:
        """Spawn ``child`` and watch it: health transitions, restarts."""
        await self._spawn(child)
        child.tasks = [
            asyncio.create_task(self._watch_health(child)),
            asyncio.create_task(self._keepalive(child)),
        ]

    async def _watch_health(self, child: Child) -> None:
        """Report health transitions (STARTING -> NOT_SERVING -> SERVING) as they happen; kill a
        child that answered before and has stopped answering for ``unresponsive_restart_s``."""
        limit = self.config.unresponsive_restart_s
        try:
            channel = probe_channel(
                self.config, child.address, gateway=child is self.gateway, extra=WATCH_CHANNEL_OPTIONS
            )
        except TlsError as e:
            self.report(f"{child.name}: cannot check its health: {e}")
            return
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            expert = pb_grpc.ExpertStub(channel)
            late = 0  # health checks in a row that ran past their deadline
            answered_at: float | None = None
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                    late = 0
                    answered_at = time.monotonic()
                except grpc.aio.AioRpcError as e:
                    late = late + 1 if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else 0
                    if 0 < late < LATE_CHECKS and child.health not in ("STARTING", "EXITED"):
                        status = child.health  # slow to answer while an engine loads: not a change
                    else:
                        status = "STARTING" if child.ready_after_s is None else "UNREACHABLE"
                    # Only a child that has served: one still starting may block its loop
                    # for a while (imports, a preflight) and is not hung.
                    served = child.ready_after_s is not None and answered_at is not None
                    silent = time.monotonic() - answered_at if served and answered_at else 0.0
                    if limit is not None and silent > limit and not self.stopping and alive(child):
                        self.report(
                            f"{child.name}: no answer to health checks for {silent:.0f} s "
                            f"(unresponsive_restart_s={limit:g}); killing it for a restart"
                        )
                        kill_group(child)  # _keep_alive sees it exit and restarts it
                        answered_at = None
                if status != child.health and not self.stopping:
                    child.health = status
                    if status == "SERVING" and child.ready_after_s is None:
                        child.ready_after_s = time.monotonic() - child.started_at
                        self.report(
                            f"{child.name}: SERVING at {child.address} after {child.ready_after_s:.1f} s"
                        )
                        self._record_descendants(child)
                    elif status == "NOT_SERVING" and child.ready_after_s is None:
                        self.report(f"{child.name}: listening at {child.address}, loading (NOT_SERVING)")
                    else:
                        self.report(f"{child.name}: {status}")
                if child.is_expert and status == "NOT_SERVING" and not child.failure and not self.stopping:
                    await self._read_failure(child, expert)
                await asyncio.sleep(HEALTH_POLL_S)

    async def _read_failure(self, child: Child, expert: pb_grpc.ExpertStub) -> None:
        """Report a NOT_SERVING expert's load failure (Info: FAILED + last_error) once it is known."""
        try:
            info = await expert.Info(pb.InfoRequest(), timeout=1.0)
        except grpc.aio.AioRpcError:
            return  # not answering yet (or gone: _keep_alive reports an exit with its log tail)
        if info.state == pb.EXPERT_STATE_FAILED:
            child.failure = info.last_error or f"no cause reported; last log lines:\n{child.tail()}"
            self.report(f"{child.name}: FAILED: {child.failure}")

    def _record_descendants(self, child: Child) -> None:
        # Remembered so that a descendant that left the process group is still stopped.
        if child.family is not None:
            child.family.record()

    async def _keepalive(self, child: Child) -> None:
        """Restart a process that exits on its own, with exponential backoff, up to max_restarts."""
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self.stopping:
                return
            kill_group(child)  # its engine processes must not outlive it
            child.health = "EXITED"
            self.report(f"{child.name}: exited with code {code}; last log lines:\n{child.tail()}")
            if time.monotonic() - child.started_at >= STABLE_AFTER_S:
                child.restarts = 0  # crashes far apart are not a crash loop
            if child.restarts >= self.config.max_restarts:
                child.gave_up = f"exited with code {code} after {child.restarts} restarts"
                if child.last_error():
                    child.gave_up += f"; last error: {child.last_error()}"
                self.report(f"{child.name}: giving up ({child.gave_up})")
                return
            # The first restart at once (a gateway or expert that was killed is back sooner),
            # then 1, 2, 4, ... s: a crash loop does not spin.
            delay = 0.0 if child.restarts == 0 else min(2.0 ** (child.restarts - 1), BACKOFF_MAX_S)
            child.restarts += 1
            self.report(f"{child.name}: restart {child.restarts}/{self.config.max_restarts} in {delay:.0f} s")
            await asyncio.sleep(delay)
            if self.stopping:
                return
            await self._spawn(child)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every expert and the gateway are SERVING; False on timeout or a child giving up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            if all(c.health == "SERVING" for c in self.children):
                return True
            if any(c.gave_up for c in self.children):
                return False
            await asyncio.sleep(HEALTH_POLL_S)
        return False

    def settled(self) -> bool:
        """Every expert SERVING, FAILED or given up (see :attr:`Child.settled`), and the gateway
        SERVING, or answering NOT_SERVING because no expert serves."""
        if not all(c.settled for c in self.experts):
            return False
        none_serving = not any(c.health == "SERVING" for c in self.experts)
        return self.gateway.settled or (none_serving and self.gateway.health == "NOT_SERVING")

    async def wait_settled(self) -> None:
        """Wait until :meth:`settled`: nothing more will happen without an operator."""
        while not self.settled():
            await asyncio.sleep(HEALTH_POLL_S)

    def failures(self) -> list[Child]:
        """The processes that failed for good: experts FAILED, processes given up on."""
        return [c for c in self.children if c.failure or c.gave_up]

    def reload(self) -> None:
        """Re-read the config file and apply it (module docstring), in the background; reloads
        requested while one runs follow it in turn."""
        task = asyncio.create_task(self.apply_reload())
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[bool]) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.report(f"config reload failed part-way: {task.exception()!r}")

    async def apply_reload(self) -> bool:
        """Validate the config file; if valid, have the gateway re-read it, stop removed experts,
        start new ones, restart changed ones. False (and nothing changed) when it is invalid."""
        async with self._reloading:
            if self.stopping:
                return False
            try:
                config = load_config(self.config_path)
            except ConfigError as e:
                self.report(f"config reload rejected, nothing changed: {e}")
                return False
            changes = diff(self.config, config)
            self.report(
                f"config reload: experts added {changes.added or 'none'}, removed "
                f"{changes.removed or 'none'}, changed {changes.changed or 'none'}"
            )
            if changes.mesh_keys:
                keys = ", ".join(changes.mesh_keys)
                self.report(f"config reload: {keys} reach the running experts only when they restart")
            self.config = config
            self.report("config reload: the gateway re-reads the config (SIGHUP)")
            if alive(self.gateway):
                assert self.gateway.proc is not None
                self.gateway.proc.send_signal(signal.SIGHUP)
            # Leaving experts stop first, all at once: a new or moved expert may be given a
            # port one of them still holds, and must not share it with the old process.
            leaving = {*changes.removed, *changes.changed}
            retired = [c for c in self.experts if c.expert_id in leaving]
            for child in retired:
                why = "removed" if child.expert_id in changes.removed else "settings changed"
                self.report(f"{child.name}: {why}; stopping it (NOT_SERVING, streams finish, grace)")
                for task in child.tasks:
                    task.cancel()
            await self._terminate(retired, time.monotonic() + config.grace_period_s)
            for child in retired:
                await self._reap(child)
            self.experts = [c for c in self.experts if c.expert_id not in leaving]
            for expert_id in [
                e.expert_id for e in config.experts if e.expert_id in {*changes.added, *changes.changed}
            ]:
                for child in self._expert_children(config, expert_id):
                    self.experts.append(child)
                    await self._launch(child)
            return True

    async def _terminate(self, children: list[Child], deadline: float) -> None:
        """SIGTERM every child's process group at once, then wait for them until ``deadline``."""
        for child in children:
            self._record_descendants(child)
            signal_group(child, signal.SIGTERM)
        for child in children:
            if child.proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(child.proc.wait(), max(deadline - time.monotonic(), 0.01))

    async def _reap(self, child: Child) -> None:
        """SIGKILL what is left of ``child`` and reap it (while the loop still runs: asyncio's
        child watcher needs it)."""
        kill_group(child)
        if child.proc is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 5)
        self.report(f"{child.name}: stopped (exit code {child.proc.returncode if child.proc else '-'})")

    async def stop(self) -> None:
        """SIGTERM every process group, wait the grace period, SIGKILL whatever is left."""
        self.stopping = True
        tasks = [*self._reloads, *(t for c in self.children for t in c.tasks)]
        for task in tasks:
            task.cancel()
        # Each ends where it was: a restart half-way through its spawn records its process first.
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + self.config.grace_period_s
        # The gateway first: it stops taking requests while the experts still serve its streams.
        for group in ([self.gateway], self.experts):
            await self._terminate(group, deadline)
        for child in self.children:
            await self._reap(child)
