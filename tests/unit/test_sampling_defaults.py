"""The model's sampling defaults under a request's own fields (no engine: the merge rules only;
tests/integration/test_real_model.py shows them applied by a real engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from expertmesh.services.expert.request import DEFAULT_MAX_TOKENS
from expertmesh.services.expert.sampling_defaults import SamplingDefaults, default_max_tokens, with_defaults
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.validation import sampling_kwargs

MODEL = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1, "max_tokens": 300}


def test_the_request_wins_and_unset_fields_take_the_models_values() -> None:
    request = sampling_kwargs(pb.SamplingParams(temperature=0, seed=3))
    merged = with_defaults(request, MODEL)
    assert merged == {
        "ignore_eos": False,
        "temperature": 0,  # greedy, as asked, over the model's 0.2
        "seed": 3,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
    }
    assert "max_tokens" not in merged  # fitted to the context separately


def test_max_tokens_default_is_the_models_max_new_tokens_else_ours() -> None:
    assert default_max_tokens(MODEL) == 300
    assert default_max_tokens({"temperature": 0.2}) == DEFAULT_MAX_TOKENS
    assert default_max_tokens({}) == DEFAULT_MAX_TOKENS


def test_defaults_are_read_once_per_engine() -> None:
    calls: list[int] = []

    def engine(values: dict[str, Any]) -> SimpleNamespace:
        def read() -> dict[str, Any]:
            calls.append(1)
            return values

        return SimpleNamespace(model_config=SimpleNamespace(get_diff_sampling_param=read))

    defaults = SamplingDefaults()
    first, second = engine({"temperature": 0.2}), engine({"top_k": 20})
    assert defaults.of(first) == {"temperature": 0.2}
    assert defaults.of(first) == {"temperature": 0.2}
    assert len(calls) == 1  # not per request
    assert defaults.of(second) == {"top_k": 20}  # a reload brings its own model's values
    assert len(calls) == 2
