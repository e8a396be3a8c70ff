"""Scenario "inprocess": ``AsyncLLM.generate`` with no serving layer, the limit for any server.

It runs in its own process (``python -m expertmesh.bench.inprocess``) so that the benchmark
process stays clean and the engine is surely gone afterwards. The parent drives it over a
line protocol: the child says ``{"ready": ...}`` on stdout once the engine is up, then answers
each ``{"op": "run", ...}`` line on stdin with one JSON result line, and stops on
``{"op": "quit"}``. Everything else the child or its engine processes print goes to stderr
(the log file), so that the protocol channel carries only protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from expertmesh import loop

from .load import BenchError, LoadResult, Recorder, run_load
from .plan import EngineSettings
from .procs import READY_TIMEOUT_S, Server


async def _serve(settings: EngineSettings, proto: IO[str]) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    from expertmesh import cpus
    from expertmesh.services.expert.engine import engine_args
    from expertmesh.services.expert.proctree import descendants

    def send(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    started = time.monotonic()
    # The very engine arguments an expert builds from the same settings.
    config = settings.expert_config()
    engine = AsyncLLM.from_engine_args(engine_args(config))
    if config.reserved_cores:  # where an expert puts its threads and engine core, so do we
        cpus.place(descendants())
    try:
        send({"ready": True, "startup_s": time.monotonic() - started})
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                return
            send(await _run_command(engine, cmd))
    finally:
        engine.shutdown()


async def _run_command(engine: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """One load run over the engine, as the parent asked for it."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from expertmesh.services.expert.request import engine_prompt

    prompts: list[str] = cmd["prompts"]
    # What an expert asks its engine for: only the new tokens and text of each step (DELTA).
    params = SamplingParams(
        max_tokens=cmd["max_tokens"],
        temperature=cmd["temperature"],
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    run = uuid.uuid4().hex[:12]
    tokenizer = engine.get_tokenizer()

    async def one(index: int, rec: Recorder) -> None:
        # As an expert does: tokenize in the loop, hand the engine the rendered token input.
        prompt = engine_prompt(tokenizer.encode(prompts[index]))
        async for out in engine.generate(prompt, params, f"{run}-{index}"):
            n = len(out.outputs[0].token_ids)
            if n:
                rec.tokens(n)

    try:
        result = await run_load(one, cmd["concurrency"], cmd["requests"], cmd["max_tokens"])
    except BenchError as e:
        return {"error": str(e)}
    return {"result": asdict(result)}


def main(argv: list[str] | None = None) -> int:
    """Child side: build the engine, then serve load commands from stdin."""
    parser = argparse.ArgumentParser(prog="python -m expertmesh.bench.inprocess", description=__doc__)
    parser.add_argument("--settings", required=True, help="EngineSettings as JSON")
    args = parser.parse_args(argv)
    settings = EngineSettings(**json.loads(args.settings))
    os.environ.update(settings.env())
    # Keep fd 1 for the protocol; send every other write to fd 1 (ours, vLLM's, its children's) to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    loop.run(_serve(settings, proto))
    return 0


class InProcessRunner:
    """Parent side: the child process, driven over its line protocol."""

    def __init__(self, settings: EngineSettings, log_dir: Path) -> None:
        self.server = Server.python_module(
            "inprocess",
            "expertmesh.bench.inprocess",
            ["--settings", json.dumps(asdict(settings))],
            log_dir,
            env=settings.env(),
        )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.server.pid

    async def start(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Start the child and wait until its engine is up; return the seconds it took."""
        self.server.start(stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        reply = await self._reply(timeout)
        if not reply.get("ready"):
            raise BenchError(f"inprocess: unexpected first message {reply}")
        self.server.record_descendants()
        return time.monotonic() - self.server.started_at

    async def _reply(self, timeout: float) -> dict[str, Any]:
        proc = self.server.proc
        assert proc is not None and proc.stdout is not None
        try:
            # A blocking read in a thread: the pipe is not the event loop's (see bench.procs).
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
        except TimeoutError:
            raise BenchError(f"inprocess: no answer after {timeout:.0f} s:\n{self.server.tail()}") from None
        if not line:
            await self.server.wait(5)
            self.server.check_alive()
            raise BenchError("inprocess: the child closed its output")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def run(
        self, prompts: list[str], concurrency: int, requests: int, max_tokens: int, temperature: float
    ) -> LoadResult:
        """Run one load in the child and return its result."""
        cmd = {
            "op": "run",
            "prompts": prompts[:requests],
            "concurrency": concurrency,
            "requests": requests,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        await self._send(cmd)
        reply = await self._reply(READY_TIMEOUT_S)
        if "error" in reply:
            raise BenchError(f"inprocess: {reply['error']}")
        return LoadResult(**reply["result"])

    async def _send(self, cmd: dict[str, Any]) -> None:
        proc = self.server.proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()  # one short line to a child that is always reading

    async def stop(self) -> None:
        """Ask the child to shut its engine down, then make sure the whole tree is gone."""
        proc = self.server.proc
        if proc is not None and self.server.returncode is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                await self._send({"op": "quit"})
                proc.stdin.close()
            await self.server.wait(30)
        await self.server.stop()


if __name__ == "__main__":
    sys.exit(main())
