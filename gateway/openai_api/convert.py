"""OpenAI bodies to ``GenerateRequest``, and ``GenerateResponse`` messages to OpenAI JSON.

``model`` names an expert id (pinned), a domain, or ``auto`` (classified as a gRPC request
without a domain is). The answer's ``model`` is the expert that served it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from expertmesh.config import MeshConfig
from expertmesh.errors import NotFound
from expertmesh.v1 import expertmesh_pb2 as pb

from .schema import ChatCompletionRequest, CompletionRequest

AUTO = "auto"
#: The engine's finish reasons in OpenAI's words (a time limit cut the answer's length).
FINISH_REASONS = {"stop": "stop", "length": "length", "time_limit": "length", "abort": "abort"}


def route_fields(model: str, config: MeshConfig) -> dict[str, str]:
    """``expert_id`` or ``domain`` for ``model``; NotFound names what exists."""
    if model == AUTO:
        return {}
    if any(e.expert_id == model for e in config.experts):
        return {"expert_id": model}
    if model in config.domains():
        return {"domain": model}
    experts = ", ".join(e.expert_id for e in config.experts)
    domains = ", ".join(config.domains())
    raise NotFound(f"model {model!r} is not an expert id ({experts}), a domain ({domains}) or {AUTO!r}")


def generate_request(
    body: ChatCompletionRequest | CompletionRequest, config: MeshConfig, request_id: str
) -> pb.GenerateRequest:
    """The GenerateRequest the gRPC front would get for the same ask."""
    sampling = pb.SamplingParams(stop=body.stops(), ignore_eos=body.ignore_eos)
    limit = body.token_limit()
    if limit is not None:
        sampling.max_tokens = limit
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(body, name)
        if value is not None:
            setattr(sampling, name, value)
    count = body.logprob_count()
    if count is not None:
        sampling.logprobs = count
    request = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    for field, value in route_fields(body.model, config).items():
        setattr(request, field, value)
    if isinstance(body, ChatCompletionRequest):
        request.messages.extend(pb.Message(role=m.role, content=m.text()) for m in body.messages)
    else:
        request.prompt = body.text()
    return request


def usage(msg: pb.GenerateResponse) -> dict[str, int]:
    """OpenAI's usage object."""
    u = msg.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else -9999.0  # JSON has no -inf; OpenAI's floor


def chat_logprobs(items: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": _logprob(t.logprob),
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": a.token, "logprob": _logprob(a.logprob), "bytes": list(a.token.encode())}
                    for a in t.top
                ],
            }
            for t in items
        ]
    }


def completion_logprobs(items: Sequence[pb.TokenLogprob], offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion; ``offset``: characters before these tokens."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [_logprob(t.logprob) for t in items],
        "top_logprobs": [{a.token: _logprob(a.logprob) for a in t.top} for t in items],
        "text_offset": offsets,
    }


class Answer:
    """Builds the OpenAI JSON of one request, chunk by chunk or whole."""

    def __init__(self, chat: bool, request_id: str, logprobs: bool) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self.logprobs = logprobs
        self.model = ""
        self.text_offset = 0
        self.completion_tokens = 0

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, msg: pb.GenerateResponse) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(msg.logprobs)
        found = completion_logprobs(msg.logprobs, self.text_offset)
        self.text_offset += len(msg.text)
        return found

    def chunk(self, msg: pb.GenerateResponse, first: bool, continuous_usage: bool) -> dict[str, Any]:
        """One streamed chunk for ``msg`` (its text delta, and the finish reason on the last)."""
        self.model = self.model or msg.expert_id
        self.completion_tokens += len(msg.token_ids)
        finish = FINISH_REASONS.get(msg.finish_reason, msg.finish_reason) or None
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(msg), "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"content": msg.text}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
            out = self._base("chat.completion.chunk")
        else:
            choice["text"] = msg.text
            out = self._base("text_completion")
        out["choices"] = [choice]
        if continuous_usage:  # vLLM's extension; the prompt's count comes with the last message
            n = self.completion_tokens
            out["usage"] = (
                usage(msg)
                if msg.HasField("usage")
                else {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
            )
        return out

    def usage_chunk(self, last: pb.GenerateResponse) -> dict[str, Any]:
        """``stream_options.include_usage``: the closing chunk, no choices, the usage."""
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(last)
        return out

    def whole(self, messages: Sequence[pb.GenerateResponse]) -> dict[str, Any]:
        """The non-streamed answer from all of the stream's messages."""
        self.model = next((m.expert_id for m in messages if m.expert_id), "")
        text = "".join(m.text for m in messages)
        last = messages[-1]
        finish = FINISH_REASONS.get(last.finish_reason, last.finish_reason) or None
        tokens = [t for m in messages for t in m.logprobs]
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = chat_logprobs(tokens) if self.logprobs else None
            out = self._base("chat.completion")
        else:
            choice["text"] = text
            choice["logprobs"] = completion_logprobs(tokens, 0) if self.logprobs else None
            out = self._base("text_completion")
        out["choices"] = [choice]
        out["usage"] = usage(last)
        return out


def route_headers(route: pb.RouteDecision) -> dict[str, str]:
    """The routing explanation as response headers (the first message's ``route``)."""
    headers = {
        "x-expertmesh-expert": route.expert_id,
        "x-expertmesh-domain": route.domain,
        "x-expertmesh-route-signal": route.signal,
        "x-expertmesh-route-confidence": f"{route.confidence:.3f}",
        "x-expertmesh-candidates": ",".join(route.candidates),
        "x-expertmesh-attempts": str(len(route.attempts) + 1),
    }
    return headers
