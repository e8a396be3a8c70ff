"""Fit a validated request to this expert's context, and build what the engine is given.

The fields themselves are checked by :mod:`expertmesh.validation` (shared with the gateway).
A request that is fine but does not fit this expert's context is an :class:`ExpertLimit`: the
gateway may try another expert with it.
"""

from __future__ import annotations

from typing import Any

from expertmesh.contract import DEFAULT_MAX_TOKENS
from expertmesh.errors import ExpertLimit
from expertmesh.v1 import expertmesh_pb2 as pb


def fit_max_tokens(
    prompt_tokens: int, sampling: pb.SamplingParams, max_model_len: int, default: int = DEFAULT_MAX_TOKENS
) -> int:
    """The max_tokens to use: the requested one if prompt + output fit the context, else an error;
    unset, ``default`` cut to the room the context leaves."""
    if prompt_tokens > max_model_len:
        raise ExpertLimit(
            f"prompt has {prompt_tokens} tokens; this expert's max_model_len is {max_model_len}"
        )
    room = max_model_len - prompt_tokens
    if room == 0:
        raise ExpertLimit(
            f"prompt has {prompt_tokens} tokens; this expert's max_model_len is {max_model_len}, "
            f"which leaves no room for output"
        )
    if not sampling.HasField("max_tokens"):
        return min(default, room)
    if sampling.max_tokens > room:
        raise ExpertLimit(
            f"sampling.max_tokens is {sampling.max_tokens}, but the prompt has {prompt_tokens} tokens and "
            f"this expert's max_model_len is {max_model_len}: at most {room} new tokens fit"
        )
    return int(sampling.max_tokens)


def engine_prompt(token_ids: list[int]) -> Any:
    """The prompt as vLLM's rendered token input, which the engine takes as it is.

    A plain ``{"prompt_token_ids": ...}`` dict is a raw prompt to vLLM: deprecated, and rendered
    again in a thread pool, one thread hop per request (at 32 streams on two cores, 0.02-0.04
    of the 0.3 cores this process used).
    """
    from vllm.inputs.engine import tokens_input

    return tokens_input(token_ids)


def sampling_params(kwargs: dict[str, Any], max_tokens: int) -> Any:
    """vLLM SamplingParams that stream only what is new (DELTA)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(output_kind=RequestOutputKind.DELTA, max_tokens=max_tokens, **kwargs)
