"""Generate greedily (ignoring EOS) with vLLM's AsyncLLM in-process and print the text as JSON.

Run as a subprocess by the tests (vLLM spawns its engine core, so it needs the main guard):
``python tests/reference_generate.py MODEL_DIR PROMPT MAX_TOKENS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


async def generate(model: str, prompt: str, max_tokens: int) -> str:
    """The greedy completion of ``prompt`` straight from AsyncLLM."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=model, dtype="bfloat16", max_model_len=1024, enforce_eager=True, seed=0)
    engine = AsyncLLM.from_engine_args(args)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        text = ""
        async for out in engine.generate(prompt, params, "reference"):
            text += out.outputs[0].text
        return text
    finally:
        engine.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    result = asyncio.run(generate(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    print("REFERENCE " + json.dumps({"text": result}), flush=True)
