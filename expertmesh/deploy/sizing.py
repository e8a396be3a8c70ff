"""How much memory an expert's pod needs: the preflight's own estimate, for the node it will run on.

The preflight (``expertmesh check``) already reckons weights + KV cache + runtime from the model
folder; here it is asked for a CPU or a GPU node instead of this machine. Where the folder is
not readable here (the weights live only on the cluster's volume), the expert's ``memory_gib``
is the figure, and without either the expert cannot be sized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from expertmesh.config import ConfigError, ExpertConfig
from expertmesh.preflight.check import inspect_expert
from expertmesh.preflight.device import DeviceFacts, GiB

Kind = Literal["cpu", "gpu"]
#: vLLM's CPU KV cache when the expert sets no kv_cache_space_gib (VLLM_CPU_KVCACHE_SPACE's default).
DEFAULT_CPU_KV_GIB = 4
#: A nominal node for the preflight: the estimate for a fixed KV cache does not depend on its size.
_NOMINAL = {"cpu": 256 * GiB, "gpu": 80 * GiB}


@dataclass(frozen=True)
class Need:
    """What one expert needs of its node, in whole GiB, and where the figure comes from."""

    memory_gib: int
    source: str


def cpu_expert(cfg: ExpertConfig) -> ExpertConfig:
    """The expert as a CPU pod runs it: its KV cache fixed (a pod's memory is its request, not the node's)."""
    if cfg.kv_cache_space_gib is not None:
        return cfg
    return cfg.model_copy(update={"kv_cache_space_gib": DEFAULT_CPU_KV_GIB})


def memory_need(cfg: ExpertConfig, kind: Kind) -> Need:
    """Memory the expert's engine takes on a ``kind`` node: RAM on CPU, memory of its GPU(s) on GPU.

    CPU: the preflight's footprint with the KV cache fixed (weights + KV + runtime). GPU: the
    least that serves one max_model_len sequence (vLLM then takes gpu_memory_utilization of the
    GPU it gets), spread over tensor_parallel_size GPUs.
    """
    if cfg.memory_gib is not None:
        return Need(math.ceil(cfg.memory_gib), "memory_gib")
    device = DeviceFacts(kind, f"{kind} node", _NOMINAL[kind], _NOMINAL[kind], 80 if kind == "gpu" else None)
    check = inspect_expert(cpu_expert(cfg) if kind == "cpu" else cfg, device)
    plan = check.plan
    if plan is None or plan.weight_bytes == 0:
        raise ConfigError(
            f"expert {cfg.expert_id}: cannot size its pod: the model folder {cfg.model_path} is not readable "
            "here; set memory_gib (weights + KV cache + runtime, GiB) in its config"
        )
    if kind == "cpu":
        return Need(
            math.ceil(plan.footprint / GiB), f"preflight estimate: weights + {plan.budget_source} + runtime"
        )
    needed = plan.minimal_footprint(device)
    return Need(math.ceil(needed / GiB), "preflight estimate: weights + one max_model_len sequence + runtime")
