"""Request checks shared by the gateway and the expert, done before any expensive work.

Every bad field comes back as INVALID_ARGUMENT with a message that names the field, the limit
and the value, so that a caller can fix the request without reading a server's log. Client
values are quoted truncated (:func:`quote`): an error message is sent as gRPC metadata, and an
8 KiB role quoted in full would turn the real error into RESOURCE_EXHAUSTED (metadata limit).
Nothing here needs a tokenizer or an engine, so the gateway refuses a bad request before
routing, and a cold lazy expert before it loads.
"""

from __future__ import annotations

import math
from typing import Any

from expertmesh.config import LimitsConfig
from expertmesh.errors import InvalidRequest
from expertmesh.v1 import expertmesh_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")
#: request_id, domain and expert_id: short, printable (a newline would forge a log line).
MAX_ID_CHARS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
#: vLLM's default ``max_logprobs``; asking for more fails in the engine.
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1
#: vLLM refuses more (SamplingParams), after a lazy engine has loaded; we refuse it first.
MAX_TEMPERATURE = 2.0
MAX_TIME_LIMIT_S = 24 * 3600.0
QUOTE_CHARS = 48


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the full length said."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_id(field: str, value: str) -> None:
    """An identifier field: at most MAX_ID_CHARS printable characters."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidRequest(f"{field} has {len(value)} characters; the limit is {MAX_ID_CHARS}")
    if not value.isprintable():
        raise InvalidRequest(f"{field} {quote(value)} contains non-printable characters")


def check_request(request: pb.GenerateRequest, limits: LimitsConfig) -> dict[str, Any]:
    """Refuse a request that breaks a limit; return its validated sampling keyword arguments."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"the request is {size} bytes; the limit is {limits.max_request_bytes} (limits.max_request_bytes)"
        )
    for field in ("request_id", "domain", "expert_id"):
        check_id(field, getattr(request, field))
    if request.prompt and request.messages:
        raise InvalidRequest("set either prompt or messages, not both")
    if not request.prompt and not request.messages:
        raise InvalidRequest("the request has neither prompt nor messages")
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(request.messages)} turns; "
            f"the limit is {limits.max_messages} (limits.max_messages)"
        )
    for i, m in enumerate(request.messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role {quote(m.role)} is not one of {', '.join(ROLES)}")
    return sampling_kwargs(request.sampling)


def sampling_kwargs(sampling: pb.SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for the set fields, validated (max_tokens and
    time_limit_s excepted: the expert applies those itself)."""
    kwargs: dict[str, Any] = {"ignore_eos": sampling.ignore_eos}
    if sampling.HasField("max_tokens") and sampling.max_tokens <= 0:
        raise InvalidRequest(f"sampling.max_tokens must be > 0, got {sampling.max_tokens}")
    if sampling.HasField("temperature"):
        t = sampling.temperature
        if not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise InvalidRequest(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}], got {t}")
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
    if sampling.HasField("time_limit_s"):
        limit = sampling.time_limit_s
        if not math.isfinite(limit) or not 0 < limit <= MAX_TIME_LIMIT_S:
            raise InvalidRequest(f"sampling.time_limit_s must be in (0, {MAX_TIME_LIMIT_S:g}], got {limit}")
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
