"""A child process driven over a line protocol: JSON commands on its stdin, one JSON reply each.

Both the in-process engine (:mod:`bench.inprocess`) and the separate client process
(:mod:`bench.remote`) run this way: the child says ``{"ready": ...}`` on stdout once it can
work, then answers each command line with one result line and stops on ``{"op": "quit"}``.
Everything else the child (or its engine processes) prints goes to stderr, the log file, so
that the protocol channel carries only protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

from .load import BenchError
from .procs import READY_TIMEOUT_S, Server

Send = Callable[[dict[str, Any]], None]


def protocol_channel() -> IO[str]:
    """Child side: keep fd 1 for the protocol; send every other write to fd 1 (ours, vLLM's,
    its children's) to stderr."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def sender(proto: IO[str]) -> Send:
    """A function that writes one protocol line."""

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    return send


async def serve_commands(send: Send, handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """Child side: answer every command line with ``handle``'s reply until ``quit`` or EOF."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return
        send(await handle(cmd))


class LineChild:
    """Parent side: the child process, driven over its line protocol."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.server.pid

    async def start(self, timeout: float = READY_TIMEOUT_S, **popen: Any) -> float:
        """Start the child and wait until it says it is ready; return the seconds it took."""
        self.server.start(stdin=subprocess.PIPE, stdout=subprocess.PIPE, **popen)
        reply = await self._reply(timeout)
        if not reply.get("ready"):
            raise BenchError(f"{self.server.name}: unexpected first message {reply}")
        self.server.record_descendants()
        return time.monotonic() - self.server.started_at

    async def ask(self, cmd: dict[str, Any], timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Send one command and return its reply; an ``error`` reply raises BenchError."""
        self._send(cmd)
        reply = await self._reply(timeout)
        if "error" in reply:
            raise BenchError(f"{self.server.name}: {reply['error']}")
        return reply

    async def _reply(self, timeout: float) -> dict[str, Any]:
        proc = self.server.proc
        assert proc is not None and proc.stdout is not None
        try:
            # A blocking read in a thread: the pipe is not the event loop's (see bench.procs).
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
        except TimeoutError:
            raise BenchError(
                f"{self.server.name}: no answer after {timeout:.0f} s:\n{self.server.tail()}"
            ) from None
        if not line:
            await self.server.wait(5)
            self.server.check_alive()
            raise BenchError(f"{self.server.name}: the child closed its output")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _send(self, cmd: dict[str, Any]) -> None:
        proc = self.server.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()  # one short line to a child that is always reading

    async def stop(self) -> None:
        """Ask the child to quit, then make sure its whole tree is gone."""
        proc = self.server.proc
        if proc is not None and self.server.returncode is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._send({"op": "quit"})
                proc.stdin.close()
            await self.server.wait(30)
        await self.server.stop()
