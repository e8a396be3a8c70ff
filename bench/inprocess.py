"""Scenario "inprocess": ``AsyncLLM.generate`` with no serving layer, the limit for any server.

It runs in its own process (``python -m expertmesh.bench.inprocess``) so that the benchmark
process stays clean and the engine is surely gone afterwards. The parent drives it over
the line protocol of :mod:`bench.child`: ``{"op": "run", ...}`` runs one load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from expertmesh import loop

from .child import LineChild, protocol_channel, sender, serve_commands
from .load import BenchError, LoadResult, Recorder, run_load
from .plan import EngineSettings
from .procs import Server


async def _serve(settings: EngineSettings, proto: IO[str]) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    from expertmesh import cpus
    from expertmesh.services.expert.engine import engine_args
    from expertmesh.services.expert.proctree import descendants

    send = sender(proto)
    started = time.monotonic()
    # The very engine arguments an expert builds from the same settings.
    config = settings.expert_config()
    engine = AsyncLLM.from_engine_args(engine_args(config))
    if config.reserved_cores:  # where an expert puts its threads and engine core, so do we
        cpus.place(descendants())
    try:
        send({"ready": True, "startup_s": time.monotonic() - started})
        await serve_commands(send, lambda cmd: _run_command(engine, cmd))
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
    loop.run(_serve(settings, protocol_channel()))
    return 0


class InProcessRunner(LineChild):
    """Parent side: the engine's child process, driven over its line protocol."""

    def __init__(self, settings: EngineSettings, log_dir: Path) -> None:
        super().__init__(
            Server.python_module(
                "inprocess",
                "expertmesh.bench.inprocess",
                ["--settings", json.dumps(asdict(settings))],
                log_dir,
                env=settings.env(),
            )
        )

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
        reply = await self.ask(cmd)
        return LoadResult(**reply["result"])


if __name__ == "__main__":
    sys.exit(main())
