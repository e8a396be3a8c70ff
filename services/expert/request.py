"""Validate a request's sampling fields and fit them to the context, before the engine sees them.

Every bad field comes back as INVALID_ARGUMENT with a message that names the field, the limit
and the value, so that a caller can fix the request without reading the expert's log. Nothing
here needs the engine: a cold lazy expert rejects a bad request without loading first.
"""

from __future__ import annotations

import math
from typing import Any

from expertmesh.errors import InvalidRequest
from expertmesh.v1 import expertmesh_pb2 as pb

#: max_tokens when neither the request nor the model's generation_config sets it: room for an
#: ordinary answer (a few paragraphs, a function: 100-400 tokens) with a bound, so that a
#: forgotten limit cannot keep a stream (and its buffered tokens) busy up to max_model_len.
DEFAULT_MAX_TOKENS = 512
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: vLLM's default ``max_logprobs``; asking for more fails in the engine.
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


def sampling_kwargs(sampling: pb.SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for the set fields, validated (max_tokens excepted)."""
    kwargs: dict[str, Any] = {"ignore_eos": sampling.ignore_eos}
    if sampling.HasField("max_tokens") and sampling.max_tokens <= 0:
        raise InvalidRequest(f"sampling.max_tokens must be > 0, got {sampling.max_tokens}")
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidRequest(f"sampling.temperature must be finite and >= 0, got {t}")
        kwargs["temperature"] = t
    if sampling.HasField("top_p"):
        if not 0 < sampling.top_p <= 1:  # also rejects NaN
            raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
        kwargs["top_p"] = sampling.top_p
    if sampling.HasField("top_k"):
        if sampling.top_k < -1:
            raise InvalidRequest(f"sampling.top_k must be -1, 0 (disabled) or > 0, got {sampling.top_k}")
        kwargs["top_k"] = max(sampling.top_k, 0)  # vLLM spells "disabled" as 0
    if sampling.HasField("seed"):
        if sampling.seed > MAX_SEED:
            raise InvalidRequest(f"sampling.seed must be <= {MAX_SEED}, got {sampling.seed}")
        kwargs["seed"] = sampling.seed
    if sampling.HasField("logprobs"):
        if sampling.logprobs > MAX_LOGPROBS:
            raise InvalidRequest(f"sampling.logprobs must be <= {MAX_LOGPROBS}, got {sampling.logprobs}")
        kwargs["logprobs"] = sampling.logprobs
    if sampling.stop:
        if len(sampling.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"sampling.stop has {len(sampling.stop)} strings; the limit is {MAX_STOP_STRINGS}"
            )
        for i, s in enumerate(sampling.stop):
            if not 0 < len(s) <= MAX_STOP_LENGTH:
                raise InvalidRequest(
                    f"sampling.stop[{i}] must be 1..{MAX_STOP_LENGTH} characters long, got {len(s)}"
                )
        kwargs["stop"] = list(sampling.stop)
    return kwargs


def fit_max_tokens(
    prompt_tokens: int, sampling: pb.SamplingParams, max_model_len: int, default: int = DEFAULT_MAX_TOKENS
) -> int:
    """The max_tokens to use: the requested one if prompt + output fit the context, else an error;
    unset, ``default`` cut to the room the context leaves."""
    if prompt_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt has {prompt_tokens} tokens; this expert's max_model_len is {max_model_len}"
        )
    room = max_model_len - prompt_tokens
    if room == 0:
        raise InvalidRequest(
            f"prompt has {prompt_tokens} tokens; this expert's max_model_len is {max_model_len}, "
            f"which leaves no room for output"
        )
    if not sampling.HasField("max_tokens"):
        return min(default, room)
    if sampling.max_tokens > room:
        raise InvalidRequest(
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
