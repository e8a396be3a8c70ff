"""Server processes for the benchmark: start, wait for health, stop cleanly; peak RSS sampling.

Each server runs in its own process group, so that stopping it reaches vLLM's engine-core
and worker processes too, but in the benchmark's session: with the kernel's autogroup
scheduling a session is a scheduling group, and a server in a session of its own was seen
starved (its stream stalled for 100-300 ms, then flushed at once) by its own spinning engine
processes. One session keeps client and servers under the same scheduling in every scenario,
as in-process AsyncLLM is. Readiness is grpc.health.v1 ``Check`` (service "") or HTTP
``/health``, never a fixed sleep. Memory is sampled with psutil over the whole process
tree, since most of an engine's memory lives in its engine-core and worker children.

Servers are started with :class:`subprocess.Popen`, which (without ``preexec_fn``) starts the
child with vfork and exec. The benchmark starts servers while its gRPC channels are busy, and
a plain fork() runs gRPC's fork handlers in this process: under load they now and then crashed
it (SIGSEGV) or the child before its exec. uvloop's subprocess support always forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import psutil

from expertmesh import cpus, procs
from expertmesh.logs import log_tail
from expertmesh.procs import free_port

from .load import BenchError

__all__ = ["ProcessSampler", "Server", "free_port"]

#: How long a server may take to become ready (a tiny engine needs ~25 s; the box is shared).
READY_TIMEOUT_S = 300.0
#: Time allowed for a graceful stop before SIGKILL.
STOP_GRACE_S = 20.0
POLL_S = 0.2
MIB = 1024 * 1024


@dataclass
class Server:
    """One server process (and its children), with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    family: procs.Family | None = None
    _log: IO[bytes] | None = None

    @classmethod
    def python_module(cls, name: str, module: str, args: list[str], log_dir: Path, **kw: Any) -> Server:
        """A ``python -m module args...`` server with this interpreter."""
        return cls(name, [sys.executable, "-m", module, *args], log_dir / f"{name}.log", **kw)

    @property
    def pid(self) -> int:
        """The server's process id (it must have been started)."""
        if self.proc is None:
            raise BenchError(f"{self.name} was not started")
        return self.proc.pid

    def start(self, new_session: bool = False, **popen: Any) -> None:
        """Start the process in its own process group; output goes to the log file unless redirected.

        ``new_session``: in a session of its own instead (as a program started from another
        terminal runs: with autogroup scheduling, in a scheduling group of its own)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        popen.setdefault("stdout", self._log)
        popen.setdefault("stderr", subprocess.STDOUT if popen["stdout"] is self._log else self._log)
        # A child inherits this thread's cores, and a trial may have narrowed them (Context.measure).
        cpus.widen_this_thread()
        self.proc = procs.spawn(self.argv, new_session, env={**os.environ, **self.env}, **popen)
        self.family = procs.Family(self.proc.pid)
        self.started_at = time.monotonic()

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while the process runs."""
        return None if self.proc is None else self.proc.poll()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True when it has."""
        return self.proc is not None and await procs.wait_exit(self.proc, timeout)

    def tail(self, lines: int = 25) -> str:
        """The last lines of the log, to say why a server failed."""
        return log_tail(self.log_path, lines)

    def check_alive(self) -> None:
        """Raise BenchError (with the log tail) when the process has exited."""
        if self.returncode is not None:
            raise BenchError(
                f"{self.name} exited with code {self.returncode}; log {self.log_path}:\n{self.tail()}"
            )

    @property
    def descendants(self) -> dict[int, psutil.Process]:
        """Every descendant recorded so far, by pid."""
        return self.family.descendants if self.family is not None else {}

    def record_descendants(self) -> None:
        """Remember the children so that one that left the process group is still stopped."""
        if self.family is not None:
            self.family.record()

    async def wait_grpc_health(
        self,
        address: str,
        timeout: float = READY_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> float:
        """Wait until grpc.health.v1 ``Check`` (service "") answers SERVING; return seconds since start.

        ``credentials``: the server speaks TLS."""
        if await procs.wait_serving(address, timeout, self.check_alive, credentials):
            return self._ready()
        raise BenchError(f"{self.name} at {address} not SERVING after {timeout:.0f} s:\n{self.tail()}")

    async def wait_http_health(self, url: str, timeout: float = READY_TIMEOUT_S) -> float:
        """Wait until ``GET url`` answers 200; return seconds since start."""
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                        if resp.status == 200:
                            return self._ready()
                await asyncio.sleep(POLL_S)
        raise BenchError(f"{self.name}: {url} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def _ready(self) -> float:
        self.record_descendants()
        return time.monotonic() - self.started_at

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the process group, wait up to ``grace``, then SIGKILL the group and its descendants."""
        if self.proc is None:
            return
        await procs.stop_async(self.proc, grace, self.family)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _role(proc: psutil.Process) -> str:
    """A readable name for a process of a server's tree (vLLM retitles its children)."""
    role = cpus.vllm_role(proc)
    if not role:
        with contextlib.suppress(psutil.Error):
            role = "resource_tracker" if any("resource_tracker" in c for c in proc.cmdline()) else ""
    return role or f"pid{proc.pid}"


class ProcessSampler:
    """Samples whole process trees in a thread: peak RSS (sum and per process) and CPU use.

    ``roots`` maps a label to a root pid; every descendant of a root counts towards it. The
    peak total is the largest sum over all trees seen in one sample (what the machine had to
    hold). CPU time is taken per process between its first and last sample; the load
    generator (``client``, this process unless the load runs in a root) and everything else
    on the machine (``other``, from the system-wide counters) are accounted too, so that a
    noisy neighbour shows up in the results instead of silently skewing them.
    """

    #: Finding a tree's members scans /proc (milliseconds, under the GIL); they rarely change.
    REFRESH_EVERY = 20

    def __init__(self, roots: dict[str, int], client: int | None = None, interval: float = 0.2) -> None:
        self.roots = roots
        self.interval = interval
        self._trees: dict[str, list[tuple[psutil.Process, str]]] = {}
        self._samples = 0
        self.peak_total = 0
        self.peaks: dict[str, int] = {}
        self._cpu: dict[str, list[float]] = {}  # name -> [first, last] cpu seconds
        self._procs: dict[int, tuple[psutil.Process, str]] = {}
        self._client = psutil.Process(client) if client else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-sampler", daemon=True)
        self._wall = 0.0
        self._sys_busy = 0.0

    def __enter__(self) -> ProcessSampler:
        self._wall = time.monotonic()
        self._sys_busy = _busy_seconds()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self._wall = time.monotonic() - self._wall
        self._sys_busy = _busy_seconds() - self._sys_busy

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _tree(self, label: str, root: int) -> list[tuple[psutil.Process, str]]:
        try:
            top = psutil.Process(root)
            members = [top, *top.children(recursive=True)]
        except psutil.Error:
            return []
        out = []
        for p in members:
            known = self._procs.get(p.pid)
            if known is None or known[0] != p:
                name = label if p.pid == root else f"{label}/{_role(p)}"
                known = self._procs[p.pid] = (p, name)
            out.append(known)
        return out

    def _cpu_seen(self, name: str, proc: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            used = t.user + t.system
            self._cpu.setdefault(name, [used, used])[1] = used

    def sample(self) -> None:
        """Take one sample now."""
        total = 0
        if self._samples % self.REFRESH_EVERY == 0:
            self._trees = {label: self._tree(label, root) for label, root in self.roots.items()}
        self._samples += 1
        for tree in self._trees.values():
            for proc, name in tree:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
                self._cpu_seen(name, proc)
        if self._client is not None:
            self._cpu_seen("client", self._client)
        self.peak_total = max(self.peak_total, total)

    @property
    def peak_total_mib(self) -> float:
        """Peak of the summed RSS of every tree, in MiB."""
        return self.peak_total / MIB

    def peaks_mib(self) -> dict[str, float]:
        """Peak RSS of each process seen, in MiB (resource trackers left out)."""
        return {k: round(v / MIB, 1) for k, v in sorted(self.peaks.items()) if "resource_tracker" not in k}

    def cpu_cores(self) -> dict[str, float]:
        """Average cores used over the sampled time: per process, the client, and everything else."""
        wall = self._wall or 1.0
        used = {k: (last - first) / wall for k, (first, last) in self._cpu.items()}
        out = {k: round(v, 2) for k, v in sorted(used.items()) if v >= 0.005}
        out["other"] = round(max(self._sys_busy / wall - sum(used.values()), 0.0), 2)
        return out


#: Below this many busy cores (this process left out) the machine counts as quiet.
QUIET_CORES = 0.4


async def wait_for_quiet(limit_s: float, max_cores: float = QUIET_CORES, window_s: float = 0.5) -> float:
    """Wait (up to ``limit_s``) until the machine, this process left out, uses under ``max_cores``.

    Called between trials so that a trial does not start while something else has the CPUs:
    a neighbour (another engine starting, a test suite), and our own servers too, since a vLLM
    engine spins a whole core for about a second after its last request; left running into the
    next trial, that core is taken from whichever scenario comes next. Returns the last
    reading, in cores.
    """
    deadline = time.monotonic() + limit_s
    while True:
        with ProcessSampler({}, client=os.getpid(), interval=window_s) as sampler:
            await asyncio.sleep(window_s)
        cores = sampler.cpu_cores()["other"]
        if cores < max_cores or time.monotonic() >= deadline:
            return cores


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), since boot."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))
