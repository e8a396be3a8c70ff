"""vLLM RequestOutput (DELTA) -> GenerateResponse chunks, with optional per-token logprobs."""

from __future__ import annotations

import math
from typing import Any

from expertmesh.v1 import expertmesh_pb2 as pb


def token_logprobs(
    token_ids: list[int], logprobs: list[dict[int, Any]] | None, top: int
) -> list[pb.TokenLogprob]:
    """One TokenLogprob per new token: the sampled token and the ``top`` most likely ones.

    vLLM gives, per position, a dict token_id -> Logprob(logprob, rank, decoded_token) holding
    the sampled token and the top-k alternatives (the sampled one may be among them or not).
    """
    out: list[pb.TokenLogprob] = []
    for token_id, alternatives in zip(token_ids, logprobs or (), strict=False):
        sampled = alternatives.get(token_id)
        entry = pb.TokenLogprob(token_id=token_id)
        if sampled is not None:
            entry.token = sampled.decoded_token or ""
            entry.logprob = sampled.logprob
            entry.rank = sampled.rank or 0
        best = sorted(alternatives.items(), key=lambda kv: kv[1].rank or 0)
        for alt_id, alt in best:
            if alt.rank is not None and 0 < alt.rank <= top:
                entry.top.add(token_id=alt_id, token=alt.decoded_token or "", logprob=alt.logprob)
        out.append(entry)
    return out


#: ``stream_interval: auto``: (streams in flight up to, tokens per message), first match wins.
AUTO_SCHEDULE = ((4, 1), (64, 8), (math.inf, 16))


def stream_interval(in_flight: int, setting: int | str = "auto") -> int:
    """Tokens per stream message for a request admitted with ``in_flight`` streams running.

    A number in the config is used as is. ``auto``: every token the moment it exists while few
    streams run; under load 8, then at most 16 tokens per message, because every message costs
    gRPC work in this process, in the gateway and in the client, and on a small CPU host that
    work is taken from the engine (bench/HISTORY.md has the rounds behind each step).
    vLLM does the coalescing (``SamplingParams.stream_interval``): the first token still goes
    out at once and the last message carries whatever is left.
    """
    if isinstance(setting, int):
        return setting
    return next(tokens for bound, tokens in AUTO_SCHEDULE if in_flight <= bound)


class Chunker:
    """Builds the stream's messages for one request and counts what was generated."""

    def __init__(self, expert_id: str, request_id: str, prompt_tokens: int, logprobs: int | None) -> None:
        self.expert_id = expert_id
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.logprobs = logprobs
        self.completion_tokens = 0
        self.time_limited = False  # set when sampling.time_limit_s ended the request
        self._first = True

    def chunk(self, out: Any) -> pb.GenerateResponse:
        """The message for one RequestOutput; ``finish_reason`` and ``usage`` on the last."""
        piece = out.outputs[0]
        ids = list(piece.token_ids)
        self.completion_tokens += len(ids)
        msg = pb.GenerateResponse(text=piece.text, token_ids=ids, expert_id=self.expert_id)
        if self._first:  # once per stream: a caller's long id is not copied into every chunk
            msg.request_id, self._first = self.request_id, False
        if self.logprobs is not None:
            msg.logprobs.extend(token_logprobs(ids, piece.logprobs, self.logprobs))
        if out.finished:
            reason = piece.finish_reason or ""
            msg.finish_reason = "time_limit" if self.time_limited and reason == "abort" else reason
            msg.usage.prompt_tokens = self.prompt_tokens
            msg.usage.completion_tokens = self.completion_tokens
        return msg
