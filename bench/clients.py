"""Streaming clients, one per wire: ours (expert and gateway alike), vLLM's gRPC, OpenAI HTTP.

Each factory returns ``one(index, recorder)`` for :func:`bench.load.run_load`. Clients are kept
lean (one shared channel or HTTP session, requests built before the clock starts, no JSON
decoding per event) so that on a two-core box the client measures the server, not itself.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from expertmesh.client import build_request
from expertmesh.v1 import expertmesh_pb2 as pb

from .load import BenchError, OneRequest, Recorder
from .plan import EXPERT_DOMAIN, LoadPlan

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def mesh_requests(plan: LoadPlan, max_tokens: int) -> list[pb.GenerateRequest]:
    """One expertmesh GenerateRequest per prompt: fixed length, greedy, ``ignore_eos``."""
    return [
        build_request(
            prompt,
            domain=EXPERT_DOMAIN,
            max_tokens=max_tokens,
            temperature=plan.temperature,
            ignore_eos=True,
        )
        for prompt in plan.prompts
    ]


def mesh_client(generate: Callable[..., Any], requests: list[pb.GenerateRequest]) -> OneRequest:
    """Stream through ``Generate`` of an ExpertStub or a GatewayStub (the same wire and client)."""

    async def one(index: int, rec: Recorder) -> None:
        async for msg in generate(requests[index]):
            n = len(msg.token_ids)
            if n:
                rec.tokens(n)

    return one


def vllm_grpc_client(stub: Any, plan: LoadPlan, max_tokens: int) -> OneRequest:
    """Stream from vLLM's gRPC server (``vllm.grpc.engine.VllmEngine/Generate``, token ids only)."""
    from smg_grpc_proto import vllm_engine_pb2 as vpb

    run = uuid.uuid4().hex[:12]  # engine request ids must be unique
    requests = [
        vpb.GenerateRequest(
            request_id=f"bench-{run}-{i}",
            text=prompt,
            sampling_params=vpb.SamplingParams(
                temperature=plan.temperature, max_tokens=max_tokens, ignore_eos=True
            ),
            stream=True,
        )
        for i, prompt in enumerate(plan.prompts)
    ]

    async def one(index: int, rec: Recorder) -> None:
        async for msg in stub.Generate(requests[index]):
            if msg.WhichOneof("response") == "chunk":
                n = len(msg.chunk.token_ids)
                if n:
                    rec.tokens(n)

    return one


def openai_client(session: Any, base_url: str, model: str, plan: LoadPlan, max_tokens: int) -> OneRequest:
    """Stream ``/v1/completions`` from an OpenAI server (vLLM's, the gateway's) with aiohttp.

    Tokens are counted from the usage vLLM streams with every event
    (``continuous_usage_stats``), not from the number of events.
    """
    import json

    url = f"{base_url}/v1/completions"
    bodies = [
        json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": plan.temperature,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            }
        ).encode()
        for prompt in plan.prompts
    ]
    headers = {"Content-Type": "application/json"}

    async def one(index: int, rec: Recorder) -> None:
        async with session.post(url, data=bodies[index], headers=headers) as resp:
            if resp.status != 200:
                raise BenchError(f"POST {url}: HTTP {resp.status}: {(await resp.text())[:500]}")
            seen = 0
            async for line in resp.content:
                found = _COMPLETION_TOKENS.search(line)
                if found:
                    total = int(found.group(1))
                    if total > seen:
                        rec.tokens(total - seen)
                        seen = total

    return one
