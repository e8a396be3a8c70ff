"""Build and release one vLLM AsyncLLM engine; its tokenizer; the memory it occupies.

Blocking calls here (building, shutting down) are run off the event loop by the lifecycle, so
that health, Info and the other RPCs keep answering while an engine loads or unloads.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import psutil

from expertmesh import cpus
from expertmesh.config import ExpertConfig

#: Memory vLLM's engine and worker processes take beyond weights and KV cache (torch, the
#: runtime, buffers); measured ~1.9 GiB on CPU for a tiny model. Only used until a load is measured.
RUNTIME_OVERHEAD_GIB = 2.0
#: KV cache size vLLM's CPU backend reserves when VLLM_CPU_KVCACHE_SPACE is not set.
DEFAULT_CPU_KV_CACHE_GIB = 4
GIB = 1024**3
#: How long an unload waits for the engine's processes to be gone after vLLM's shutdown.
ENGINE_EXIT_TIMEOUT_S = 15.0


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


def build_engine(cfg: ExpertConfig) -> Any:
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


def descendants() -> list[psutil.Process]:
    """This process's descendants now (to tell which of them an engine started).

    multiprocessing's resource tracker, started with the first engine and kept for the life
    of the process, is left out: it is not the engine's and never exits on its own.
    """
    found = []
    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(proc.cmdline()):
                    found.append(proc)
    return found


def shutdown_engine(engine: Any, procs: list[psutil.Process]) -> None:
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


def load_tokenizer(cfg: ExpertConfig) -> Any:
    """The tokenizer the engine uses, loaded on its own so that a cold expert can tokenize."""
    from vllm.tokenizers import get_tokenizer

    kwargs = {k: cfg.engine_args[k] for k in ("tokenizer_mode", "revision") if k in cfg.engine_args}
    return get_tokenizer(cfg.tokenizer or cfg.model_path, trust_remote_code=cfg.trust_remote_code, **kwargs)


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of a process and all its descendants (vLLM's engine core and workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # exited while we looked
            total += proc.memory_info().rss
    return total


def estimate_load_bytes(cfg: ExpertConfig) -> int:
    """What loading adds to resident memory, before any load was measured: weights + KV + runtime."""
    if cfg.memory_gib is not None:
        return int(cfg.memory_gib * GIB)
    path = Path(cfg.model_path)
    weights = 0
    if path.is_dir():
        weights = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    kv = cfg.kv_cache_space_gib if cfg.kv_cache_space_gib is not None else DEFAULT_CPU_KV_CACHE_GIB
    return int(weights + (kv + RUNTIME_OVERHEAD_GIB) * GIB)
