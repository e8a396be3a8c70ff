"""One process that ``expertmesh up`` supervises, and how it is signalled and killed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh import procs
from expertmesh.logs import log_tail
from expertmesh.services.expert.ipc_dir import remove_left_by


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    address: str
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    health: str = "STARTING"
    ready_after_s: float | None = None
    restarts: int = 0
    gave_up: str = ""
    is_expert: bool = False
    #: An expert's load failure, as its Info reports it (state FAILED, last_error).
    failure: str = ""
    family: procs.Family | None = None  # its process group and every descendant seen
    expert_id: str = ""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # its health watch and keep-alive

    def tail(self, lines: int = 15) -> str:
        """The last lines of this child's log, to show why it failed."""
        return log_tail(self.log_path, lines)

    @property
    def settled(self) -> bool:
        """SERVING, FAILED, or given up: nothing more will happen without an operator."""
        return self.health == "SERVING" or bool(self.failure or self.gave_up)

    def last_error(self) -> str:
        """The last line of the log that reports an error: the likely reason it exited."""
        for line in reversed(self.tail(200).splitlines()):
            if "ERROR" in line or "error" in line or "Error" in line:
                return line.strip()
        return ""


def alive(child: Child) -> bool:
    return child.proc is not None and child.proc.returncode is None


def signal_group(child: Child, sig: int) -> None:
    if child.family is not None and alive(child):
        child.family.signal(sig)


def kill_group(child: Child) -> None:
    """SIGKILL the child's process group and every descendant recorded for it."""
    if child.family is not None:
        child.family.kill()
    if child.proc is not None:
        remove_left_by(child.proc.pid)  # an expert killed (OOM, kill -9) could not remove it
