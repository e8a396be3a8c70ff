"""The real small instruct model on a real engine: its answers are real, and its own sampling
defaults (generation_config.json) apply to whatever a request leaves unset.

One expert process on SmolLM2-135M-Instruct (30 layers: slower than the tiny models, so only
the tests of answer quality and of the model's defaults use it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from expertmesh.config import load_config
from expertmesh.demo_models import REAL_MODEL, REAL_MODEL_SAMPLING
from expertmesh.services.expert.request import DEFAULT_MAX_TOKENS
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import start_expert, stop_group
from ..support import demo_expert, wait_serving, write_config

pytestmark = pytest.mark.engine
REVERSE = "Write a Python function that reverses a string."


@pytest.fixture(scope="module")
def expert(tmp_path_factory: pytest.TempPathFactory, real_model: Path) -> Iterator[str]:
    """The address of a SERVING expert on the real model."""
    tmp = tmp_path_factory.mktemp("real")
    path = write_config(tmp / "mesh.yaml", [demo_expert("smol", "general", REAL_MODEL, max_model_len=2048)])
    proc = start_expert(path, "smol", tmp / "logs")
    address = load_config(path).expert_address(0)
    try:
        yield address
    finally:
        stop_group(proc)


async def _complete(address: str, **request: object) -> tuple[str, list[int], pb.GenerateResponse]:
    await wait_serving(address)
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.ExpertStub(channel).Generate(pb.GenerateRequest(**request), timeout=300)  # type: ignore[arg-type]
        messages = [m async for m in call]
        assert await call.code() == grpc.StatusCode.OK, await call.details()
    return "".join(m.text for m in messages), [t for m in messages for t in m.token_ids], messages[-1]


async def test_greedy_answer_to_a_code_question_is_code(expert: str) -> None:
    # No max_tokens: the default must leave room for the whole answer, which ends on its own.
    text, _, last = await _complete(
        expert, messages=[pb.Message(role="user", content=REVERSE)], sampling=pb.SamplingParams(temperature=0)
    )
    print(f"\n{REVERSE}\n{text}")
    assert "def " in text and "return" in text, text
    assert last.finish_reason == "stop", (last.finish_reason, last.usage.completion_tokens)
    assert 0 < last.usage.completion_tokens < DEFAULT_MAX_TOKENS


async def test_unset_sampling_fields_take_the_models_generation_config(expert: str) -> None:
    story = [pb.Message(role="user", content="Tell me a short story about a dragon.")]
    # The folder's generation_config.json holds the model card's temperature and top_p.
    model_defaults = pb.SamplingParams(seed=7, max_tokens=40, **REAL_MODEL_SAMPLING)  # type: ignore[arg-type]
    neutral = pb.SamplingParams(seed=7, max_tokens=40, temperature=1.0, top_p=1.0)
    unset = pb.SamplingParams(seed=7, max_tokens=40)
    _, unset_ids, _ = await _complete(expert, messages=story, sampling=unset)
    _, default_ids, _ = await _complete(expert, messages=story, sampling=model_defaults)
    _, neutral_ids, _ = await _complete(expert, messages=story, sampling=neutral)
    assert unset_ids == default_ids  # same seed, same sampling: the model's defaults were applied
    assert unset_ids != neutral_ids  # and not vLLM's neutral temperature 1, top_p 1
