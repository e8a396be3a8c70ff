"""One vLLM AsyncLLM engine and its lifecycle state, owned by one expert process."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.errors import Unavailable
from expertmesh.v1 import expertmesh_pb2 as pb

log = logging.getLogger(__name__)


def engine_args(cfg: ExpertConfig) -> Any:
    """vLLM AsyncEngineArgs for an expert; ``engine_args`` from the config passes through."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs: dict[str, Any] = {
        "model": cfg.model_path,
        "tokenizer": cfg.tokenizer,
        "dtype": cfg.dtype,
        "quantization": cfg.quantization,
        "max_model_len": cfg.max_model_len,
        "trust_remote_code": cfg.trust_remote_code,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": cfg.seed,
        "disable_log_stats": True,
    }
    optional = {
        "max_num_seqs": cfg.max_num_seqs,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs.update(cfg.engine_args)
    return AsyncEngineArgs(**kwargs)


class EngineHost:
    """Holds the expert's engine, its state (COLD -> LOADING -> READY | FAILED) and load facts."""

    def __init__(self, cfg: ExpertConfig) -> None:
        self.cfg = cfg
        self.engine: Any = None
        self.state: int = pb.EXPERT_STATE_COLD
        self.load_seconds = 0.0
        self.last_error = ""

    async def load(self) -> None:
        """Build the engine off the event loop so health and Info keep answering while it loads."""
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.cfg.kv_cache_space_gib is not None:
            # Read by the engine core process that vLLM spawns, which inherits our environment.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_space_gib)
        self.state = pb.EXPERT_STATE_LOADING
        start = time.monotonic()
        try:
            args = engine_args(self.cfg)
            self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        except Exception as e:
            self.state = pb.EXPERT_STATE_FAILED
            self.last_error = f"{type(e).__name__}: {e}"
            log.error(
                "expert %s failed to load %s: %s", self.cfg.expert_id, self.cfg.model_path, self.last_error
            )
            raise
        self.load_seconds = time.monotonic() - start
        self.state = pb.EXPERT_STATE_READY
        log.info("expert %s loaded %s in %.1f s", self.cfg.expert_id, self.cfg.model_path, self.load_seconds)

    def engine_died(self) -> bool:
        """True (and state FAILED with the cause) once the loaded engine has died."""
        if self.engine is None or not self.engine.errored:
            return False
        if self.state != pb.EXPERT_STATE_FAILED:
            self.state = pb.EXPERT_STATE_FAILED
            self.last_error = f"engine died: {self.engine.dead_error}"
        return True

    def ready_engine(self) -> Any:
        """The engine, or Unavailable naming why there is none to serve with."""
        self.engine_died()
        if self.state != pb.EXPERT_STATE_READY:
            name = pb.ExpertState.Name(self.state).removeprefix("EXPERT_STATE_")
            reason = f": {self.last_error}" if self.last_error else ""
            raise Unavailable(f"expert {self.cfg.expert_id} is {name}{reason}")
        return self.engine

    def shutdown(self) -> None:
        """Stop the engine and its engine-core processes."""
        if self.engine is not None:
            self.state = pb.EXPERT_STATE_UNLOADING
            self.engine.shutdown()
            self.engine = None
            self.state = pb.EXPERT_STATE_COLD


@asynccontextmanager
async def engine_host(cfg: ExpertConfig) -> AsyncIterator[EngineHost]:
    """An EngineHost whose engine is always shut down on exit, however the block ends."""
    host = EngineHost(cfg)
    try:
        yield host
    finally:
        host.shutdown()
