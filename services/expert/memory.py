"""What loading an expert's engine adds to resident memory, before any load was measured."""

from __future__ import annotations

from pathlib import Path

from expertmesh.config import ExpertConfig

#: Memory vLLM's engine and worker processes take beyond weights and KV cache (torch, the
#: runtime, buffers); measured ~1.9 GiB on CPU for a tiny model. Only used until a load is measured.
RUNTIME_OVERHEAD_GIB = 2.0
#: KV cache size vLLM's CPU backend reserves when VLLM_CPU_KVCACHE_SPACE is not set.
DEFAULT_CPU_KV_CACHE_GIB = 4
GIB = 1024**3


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
