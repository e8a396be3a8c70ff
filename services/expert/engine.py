"""Build and release one vLLM AsyncLLM engine.

Blocking calls here (building, shutting down) are run off the event loop by the lifecycle, so
that health, Info and the other RPCs keep answering while an engine loads or unloads.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import TYPE_CHECKING, Any

import psutil

from expertmesh import cpus
from expertmesh.config import ExpertConfig

if TYPE_CHECKING:  # vLLM is imported when an engine is built, not when the expert starts
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

#: How long an unload waits for the engine's processes to be gone after vLLM's shutdown.
ENGINE_EXIT_TIMEOUT_S = 15.0


def engine_args(cfg: ExpertConfig) -> AsyncEngineArgs:
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
        # vLLM builds its request spans from per-request stats, and its Prometheus metrics (served
        # on the expert's /metrics) from the engine's: with either on, stats must be.
        "disable_log_stats": cfg.metrics_port is None and "otlp_traces_endpoint" not in cfg.engine_args,
    }
    optional = {
        "max_num_seqs": cfg.max_num_seqs,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
        # vLLM's own admission control: a full queue raises QueueOverflowError (RESOURCE_EXHAUSTED).
        "max_num_queued_reqs": cfg.max_queue,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs.update(cfg.engine_args)
    return AsyncEngineArgs(**kwargs)


class PreflightError(RuntimeError):
    """``expertmesh check`` found errors in this expert's config or model files: no engine is started."""


def build_engine(cfg: ExpertConfig) -> AsyncLLM:
    """A new AsyncLLM for ``cfg`` (blocking: tens of seconds to minutes), after the preflight."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from expertmesh.preflight import check_expert

    # The same checks as `expertmesh check`: a problem that can be read off the files is named
    # with its fix before vLLM spends minutes (or crashes) finding it.
    errors = [f for f in check_expert(cfg) if f.severity == "error"]
    if errors:
        raise PreflightError("; ".join(str(f) for f in errors))

    # The engine's processes inherit this thread's cores, and vLLM picks its worker's from them.
    cpus.widen_this_thread()
    if cfg.kv_cache_space_gib is not None:
        # Read by the engine core process that vLLM spawns, which inherits our environment.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_space_gib)
    return AsyncLLM.from_engine_args(engine_args(cfg))


def shutdown_engine(engine: AsyncLLM, procs: list[psutil.Process]) -> None:
    """Shut the engine down and wait until its processes ``procs`` are gone and their memory free.

    vLLM's shutdown returns once it has signalled (or killed) its processes; a killed worker
    may still be releasing gigabytes for a moment, and COLD should mean the memory is back.
    """
    engine.shutdown()
    deadline = time.monotonic() + ENGINE_EXIT_TIMEOUT_S
    while not all(_gone(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    multiprocessing.active_children()  # reap the engine core, our child, so no zombie stays


def _gone(proc: psutil.Process) -> bool:
    # A zombie has released its memory; an orphaned one may never be reaped in a container
    # whose first process does not reap, so waiting for it to disappear could take forever.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
