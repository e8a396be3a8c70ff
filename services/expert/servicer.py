"""expertmesh.v1.Expert: Generate streams new text from the engine as it is produced."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from expertmesh.errors import grpc_errors
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .engine import EngineHost
from .request import prompt_text, sampling_params


class ExpertServicer(pb_grpc.ExpertServicer):
    """Serves one expert's engine."""

    def __init__(self, host: EngineHost) -> None:
        self.host = host
        self.in_flight = 0

    @grpc_errors
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = self.host.ready_engine()
        params = sampling_params(request.sampling)
        prompt = prompt_text(request, engine.get_tokenizer(), self.host.cfg.chat_template)
        request_id = request.request_id or uuid.uuid4().hex
        expert_id = self.host.cfg.expert_id
        completion_tokens = 0
        self.in_flight += 1
        try:
            # Cancelling this handler (client cancel, deadline) raises CancelledError inside
            # engine.generate, which aborts the engine request.
            async for out in engine.generate(prompt, params, request_id):
                piece = out.outputs[0]
                completion_tokens += len(piece.token_ids)
                msg = pb.GenerateResponse(
                    text=piece.text, token_ids=piece.token_ids, expert_id=expert_id, request_id=request_id
                )
                if out.finished:
                    msg.finish_reason = piece.finish_reason or ""
                    msg.usage.prompt_tokens = len(out.prompt_token_ids or ())
                    msg.usage.completion_tokens = completion_tokens
                yield msg
        finally:
            self.in_flight -= 1

    @grpc_errors
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        cfg = self.host.cfg
        engine = self.host.engine
        return pb.InfoResponse(
            expert_id=cfg.expert_id,
            domain=cfg.domain,
            model_path=cfg.model_path,
            dtype=cfg.dtype,
            quantization=cfg.quantization or "",
            max_model_len=cfg.max_model_len or 0,
            state=self.host.state,  # type: ignore[arg-type]
            load_seconds=self.host.load_seconds,
            last_error=self.host.last_error,
            requests_in_flight=self.in_flight,
            engine_unfinished_requests=engine.get_num_unfinished_requests() if engine else 0,
        )
