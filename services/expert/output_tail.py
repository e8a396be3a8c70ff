"""Keep the last lines written to stdout and stderr by this process and its engine processes.

vLLM builds its engine in child processes (EngineCore, Worker). When a load fails there, the
parent only gets "Engine core initialization failed. See root cause above": the real cause
(a corrupt weights file, an unsupported architecture, too little memory) is logged by the
child to the stdout/stderr it inherited (vLLM logs to stdout). So the expert routes file
descriptors 1 and 2 through pipes: threads copy everything to the original streams unchanged
(the log stays complete) and keep the recent lines, in which :func:`root_cause` finds the
first exception of a failed load.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections import deque

#: A traceback's last line: ``module.ExceptionName: message``, optionally behind vLLM's
#: ``(Worker pid=1) ERROR 11-24 02:10:52 [file.py:953]`` log prefix.
_EXCEPTION_LINE = re.compile(
    r"^(?:\([^)]*pid=\d+\) ERROR [^\[]*\[[^\]]*\] )?"
    r"(?P<text>(?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception|Exit|Fault)\w*: .+)$"
)

MAX_LINE_BYTES = 65536


class OutputTail:
    """A tee on file descriptors 1 and 2 that remembers the last ``max_lines`` lines of both."""

    def __init__(self, max_lines: int = 4000) -> None:
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._count = 0  # lines seen so far, including those the deque has dropped
        self._lock = threading.Lock()
        self._installed: list[tuple[int, int, threading.Thread]] = []  # (fd, original copy, pump)

    def install(self, fds: tuple[int, ...] = (1, 2)) -> OutputTail:
        """Route ``fds`` (and so every child that inherits them) through this tail."""
        for fd in fds:
            read_fd, write_fd = os.pipe()
            original = os.dup(fd)
            os.dup2(write_fd, fd)
            os.close(write_fd)
            pump = threading.Thread(
                target=self._pump, args=(read_fd, original), daemon=True, name=f"tail-{fd}"
            )
            pump.start()
            self._installed.append((fd, original, pump))
        return self

    def close(self, timeout: float = 0.5) -> None:
        """Put the original streams back and let the pumps pass on what is still in the pipes."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original, _ in self._installed:
            os.dup2(original, fd)
        # A pump ends when no process holds its pipe any more; helpers of vLLM may still, so
        # do not wait long: what was written before the restore is copied within milliseconds.
        for _, _, pump in self._installed:
            pump.join(timeout)
        self._installed.clear()

    def _pump(self, read_fd: int, out_fd: int) -> None:
        partial = b""
        copy_to: int | None = out_fd
        while chunk := os.read(read_fd, 65536):
            view = memoryview(chunk)
            while copy_to is not None and view:
                try:
                    view = view[os.write(copy_to, view) :]
                except OSError:
                    # The original stream is gone (a closed pipe): keep draining ours anyway,
                    # or every writer in this process tree would block once the pipe is full.
                    copy_to = None
            *lines, partial = (partial + chunk).split(b"\n")
            if len(partial) > MAX_LINE_BYTES:  # progress bars redraw with \r and never end a line
                lines.append(partial[-MAX_LINE_BYTES:])
                partial = b""
            with self._lock:
                for line in lines:
                    self._lines.append(line.decode(errors="replace"))
                self._count += len(lines)

    def add(self, line: str) -> None:
        """Record a line without writing it (tests)."""
        with self._lock:
            self._lines.append(line)
            self._count += 1

    @property
    def position(self) -> int:
        """A mark for :meth:`since`: the number of lines seen so far."""
        with self._lock:
            return self._count

    def since(self, position: int) -> list[str]:
        """The lines seen after ``position`` that are still kept."""
        with self._lock:
            kept_from = self._count - len(self._lines)
            return list(self._lines)[max(position - kept_from, 0) :]


def root_cause(lines: list[str]) -> str | None:
    """The first exception line of the first traceback in ``lines``: what went wrong first."""
    in_traceback = False
    for line in lines:
        if "Traceback (most recent call last):" in line:
            in_traceback = True
            continue
        match = _EXCEPTION_LINE.match(line.rstrip())
        if in_traceback and match:
            return match.group("text")
    return None
