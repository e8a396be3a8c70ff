"""Turn a GenerateRequest into what vLLM takes: a prompt and SamplingParams, validated first.

Validation happens here, before the engine sees anything, so that every bad field comes
back as INVALID_ARGUMENT with a message naming the field, the limit and the value.
"""

from __future__ import annotations

import math
from typing import Any

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from expertmesh.errors import InvalidRequest
from expertmesh.v1 import expertmesh_pb2 as pb

DEFAULT_MAX_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
ROLES = ("system", "user", "assistant", "tool")


def sampling_params(sampling: pb.SamplingParams) -> SamplingParams:
    """Validated vLLM SamplingParams that stream only the new text (DELTA)."""
    kwargs: dict[str, Any] = {"max_tokens": DEFAULT_MAX_TOKENS}
    if sampling.HasField("max_tokens"):
        if sampling.max_tokens <= 0:
            raise InvalidRequest(f"sampling.max_tokens must be > 0, got {sampling.max_tokens}")
        kwargs["max_tokens"] = sampling.max_tokens
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidRequest(f"sampling.temperature must be finite and >= 0, got {t}")
        kwargs["temperature"] = t
    if sampling.HasField("top_p"):
        if not 0 < sampling.top_p <= 1:
            raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {sampling.top_p}")
        kwargs["top_p"] = sampling.top_p
    if sampling.HasField("top_k"):
        if sampling.top_k < -1:
            raise InvalidRequest(f"sampling.top_k must be -1, 0 (disabled) or > 0, got {sampling.top_k}")
        kwargs["top_k"] = sampling.top_k
    if sampling.HasField("seed"):
        kwargs["seed"] = sampling.seed
    if sampling.stop:
        if len(sampling.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"sampling.stop has {len(sampling.stop)} strings; the limit is {MAX_STOP_STRINGS}"
            )
        for s in sampling.stop:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidRequest(
                    f"sampling.stop strings must be 1..{MAX_STOP_LENGTH} characters, got one of {len(s)}"
                )
        kwargs["stop"] = list(sampling.stop)
    return SamplingParams(output_kind=RequestOutputKind.DELTA, ignore_eos=sampling.ignore_eos, **kwargs)


def prompt_text(request: pb.GenerateRequest, tokenizer: Any, chat_template: str | None = None) -> str:
    """The prompt as text: ``prompt`` as given, or ``messages`` rendered with the chat template."""
    if request.prompt and request.messages:
        raise InvalidRequest("set either prompt or messages, not both")
    if request.prompt:
        return request.prompt
    if not request.messages:
        raise InvalidRequest("the request has neither prompt nor messages")
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequest(
            "this expert's model has no chat template, so messages cannot be rendered; "
            "send a raw prompt or configure chat_template for the expert"
        )
    turns = [{"role": m.role, "content": m.content} for m in request.messages]
    text = tokenizer.apply_chat_template(
        turns, tokenize=False, add_generation_prompt=True, chat_template=template
    )
    return str(text)
