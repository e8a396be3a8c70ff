"""Memory: does one sequence of max_model_len fit the KV cache, do the weights fit, does the mesh fit?

KV cache bytes per token and layer = 2 (K and V) x KV heads x head size x dtype size (MLA models
keep one latent instead). Full-attention layers hold every token; sliding-window layers hold at
most ``window - 1 + max_num_batched_tokens`` tokens (vLLM's SlidingWindowSpec), so on models that
mix them (Gemma 2/3) the long-context cost comes from the full layers only. Blocks are counted as
vLLM counts them (whole blocks, one block kept back by the pool), and the largest fitting
max_model_len is found by the same binary search as vLLM's ``estimate_max_model_len``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from expertmesh.config import ExpertConfig
from expertmesh.preflight.device import DeviceFacts
from expertmesh.preflight.findings import Finding, error, info, warning
from expertmesh.preflight.model_facts import ModelFacts

GiB = 1 << 30
KiB = 1 << 10
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Memory an engine needs besides weights and KV cache (torch and vLLM runtime, the engine-core
#: process, activations). CPU: a 2-layer demo model with a 1 GiB KV cache measured ~2.9 GiB RSS
#: on this project's CPU build. GPU: activation peak and CUDA graphs, typically 1-3 GiB.
ENGINE_OVERHEAD_BYTES = {"cpu": 2 * GiB, "gpu": 2 * GiB}
#: vLLM's block size when none is set: the CPU platform picks 128 (CpuPlatform.check_and_update_config),
#: CUDA attention backends 16.
DEFAULT_BLOCK_SIZE = {"cpu": 128, "gpu": 16}


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _vllm_default(name: str, fallback: float) -> float:
    """A default of vLLM's EngineArgs / SchedulerConfig (so a vLLM upgrade moves it with us)."""
    try:
        if name == "max_num_batched_tokens":
            from vllm.config.scheduler import SchedulerConfig

            return float(SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
        from vllm.engine.arg_utils import EngineArgs

        return float(getattr(EngineArgs, name))
    except (ImportError, AttributeError, TypeError, ValueError):
        return fallback


@dataclass(frozen=True)
class KVLayout:
    """How the KV cache grows with the sequence length."""

    bytes_per_token_layer: int  # one layer, one token
    windows: list[int | None]  # per layer, as ModelFacts.layer_windows
    block_size: int
    in_flight_tokens: int  # max_num_batched_tokens: what sliding layers hold beyond their window

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token over all layers when every layer holds every token."""
        return self.bytes_per_token_layer * len(self.windows)

    @property
    def reserved_bytes(self) -> int:
        """The (null) block per layer that vLLM's block pool keeps back from every request."""
        return len(self.windows) * self.block_size * self.bytes_per_token_layer

    def sequence_bytes(self, max_len: int) -> int:
        """KV bytes one sequence of ``max_len`` tokens occupies, in whole blocks."""
        bs = self.block_size
        blocks = 0
        for window in self.windows:
            if window is None:
                blocks += math.ceil(max_len / bs)
            else:
                held = min(window - 1 + self.in_flight_tokens, max_len)
                blocks += math.ceil(held / bs) + 1
        return blocks * bs * self.bytes_per_token_layer

    def bytes_needed(self, max_len: int) -> int:
        """KV cache size needed to serve one sequence of ``max_len`` tokens."""
        return self.sequence_bytes(max_len) + self.reserved_bytes

    def largest_fitting(self, budget: int, upper: int) -> int:
        """The largest max_model_len <= ``upper`` whose sequence fits ``budget``; 0 when none does."""
        if self.bytes_needed(1) > budget:
            return 0
        lo, hi = 1, upper
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.bytes_needed(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def describe(self, max_len: int) -> str:
        """The formula with this model's numbers; windows as long as the sequence count as full."""
        sliding = [w for w in self.windows if w is not None and w < max_len]
        text = f"{self.bytes_per_token / KiB:.0f} KiB/token over {len(self.windows)} layers"
        if sliding:
            full = len(self.windows) - len(sliding)
            text += f" ({full} full-attention, {len(sliding)} sliding-window layers of {max(sliding)} tokens)"
        return text


def kv_layout(cfg: ExpertConfig, facts: ModelFacts, dtype: str, device: DeviceFacts) -> KVLayout:
    """The expert's KV cache layout for the dtype the engine will use."""
    kv_dtype = str(cfg.engine_args.get("kv_cache_dtype", "auto"))
    # "auto" stores the KV cache in the model dtype; fp8 variants take one byte per value.
    size = 1 if kv_dtype.startswith("fp8") else DTYPE_BYTES.get(kv_dtype, DTYPE_BYTES.get(dtype, 2))
    tp = max(cfg.tensor_parallel_size, 1)
    if facts.is_mla:  # one compressed latent per token and layer, shared by K and V, not split by TP
        per_layer = facts.head_size * size
    else:
        per_layer = 2 * math.ceil(facts.num_kv_heads / tp) * facts.head_size * size
    block = int(cfg.engine_args.get("block_size") or DEFAULT_BLOCK_SIZE[device.kind])
    in_flight = int(
        cfg.engine_args.get("max_num_batched_tokens") or _vllm_default("max_num_batched_tokens", 2048)
    )
    return KVLayout(per_layer, list(facts.layer_windows), block, in_flight)


@dataclass(frozen=True)
class MemoryPlan:
    """What one expert's engine will hold, for the per-expert and the mesh-wide checks."""

    expert_id: str
    eager: bool
    weight_bytes: int
    kv_budget: int  # bytes the KV cache gets
    footprint: int  # bytes the engine takes from the device in all
    budget_source: str  # where kv_budget comes from, for people
    knob: str  # the setting that sizes the KV cache, named in fixes
    gpu_memory_utilization: float | None  # set when a share of the device sizes it (automatic)
    kv_needed: int = 0  # bytes one sequence of max_model_len needs

    def minimal_footprint(self, device: DeviceFacts) -> int:
        """The least the engine can take and still serve one max_model_len sequence."""
        return self.weight_bytes + self.kv_needed + ENGINE_OVERHEAD_BYTES[device.kind]


def _env_kv_space() -> int | None:
    value = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    try:
        gib = int(value)
    except ValueError:
        return None
    return gib if gib > 0 else None


def _utilization(cfg: ExpertConfig) -> float:
    value = cfg.gpu_memory_utilization or cfg.engine_args.get("gpu_memory_utilization")
    return float(value) if value else _vllm_default("gpu_memory_utilization", 0.9)


def plan_memory(cfg: ExpertConfig, device: DeviceFacts, weight_bytes: int) -> MemoryPlan:
    """Where the expert's KV cache size comes from, and what the engine takes in all.

    CPU: ``kv_cache_space_gib`` (the expert exports it as VLLM_CPU_KVCACHE_SPACE) > the
    VLLM_CPU_KVCACHE_SPACE it inherits > ``engine_args.kv_cache_memory_bytes`` (vLLM's CPU
    platform lets the environment variable override the engine argument) > automatic:
    gpu_memory_utilization x RAM minus what the process already holds (vLLM's CPUWorker).
    GPU: ``engine_args.kv_cache_memory_bytes`` > gpu_memory_utilization x GPU memory minus
    weights and activations.
    """
    weights = math.ceil(weight_bytes / max(cfg.tensor_parallel_size, 1))
    overhead = ENGINE_OVERHEAD_BYTES[device.kind]
    explicit = cfg.engine_args.get("kv_cache_memory_bytes")
    env_gib = _env_kv_space() if device.is_cpu else None
    fixed: tuple[int, str, str] | None = None
    if device.is_cpu and cfg.kv_cache_space_gib is not None:
        gib = cfg.kv_cache_space_gib
        fixed = (gib * GiB, f"kv_cache_space_gib: {gib}", "kv_cache_space_gib")
    elif env_gib is not None:
        fixed = (env_gib * GiB, f"VLLM_CPU_KVCACHE_SPACE={env_gib}", "kv_cache_space_gib")
    elif explicit:
        fixed = (int(explicit), "engine_args.kv_cache_memory_bytes", "engine_args.kv_cache_memory_bytes")
    if fixed is not None:
        kv, source, knob = fixed
        return MemoryPlan(
            cfg.expert_id, cfg.load == "eager", weights, kv, weights + kv + overhead, source, knob, None
        )
    util = _utilization(cfg)
    share = int(util * device.total_memory)
    if device.is_cpu:
        source = f"automatic: {util:g} x {_gib(device.total_memory)} RAM - weights - runtime"
        knob = "kv_cache_space_gib"
    else:
        source = f"gpu_memory_utilization {util:g} x {_gib(device.total_memory)} - weights - activations"
        knob = "gpu_memory_utilization"
    return MemoryPlan(
        cfg.expert_id, cfg.load == "eager", weights, share - weights - overhead, share, source, knob, util
    )


def _utilization_for(footprint: int, device: DeviceFacts) -> float:
    return math.ceil(footprint / device.total_memory * 100) / 100


def _raise_fix(plan: MemoryPlan, device: DeviceFacts) -> str:
    """How to give the KV cache what one max_model_len sequence needs, with the setting that sizes it."""
    if plan.knob == "gpu_memory_utilization":
        util = _utilization_for(plan.minimal_footprint(device), device)
        if util <= 0.98:
            return f"raise gpu_memory_utilization to {util:.2f}"
        return "use a GPU with more memory, or tensor_parallel_size over several GPUs"
    if plan.knob == "engine_args.kv_cache_memory_bytes":
        return f"raise engine_args.kv_cache_memory_bytes to {plan.kv_needed}"
    verb = "raise" if plan.gpu_memory_utilization is None else "set"
    return f"{verb} kv_cache_space_gib to {math.ceil(plan.kv_needed / GiB)}"


def check_memory(
    cfg: ExpertConfig,
    facts: ModelFacts,
    dtype: str,
    weight_bytes: int | None,
    device: DeviceFacts,
) -> tuple[MemoryPlan | None, list[Finding]]:
    """KV cache vs max_model_len, and weights + KV + runtime vs the device's memory."""
    findings: list[Finding] = []
    if cfg.kv_cache_space_gib is not None and not device.is_cpu:
        findings.append(
            info("kv-space-ignored", "kv_cache_space_gib only sizes the KV cache on CPU hosts; this is a GPU")
        )
    if facts.num_layers <= 0 or facts.head_size <= 0:
        return None, findings
    layout = kv_layout(cfg, facts, dtype, device)
    max_len = cfg.max_model_len or facts.default_max_len or 2048
    len_source = "max_model_len" if cfg.max_model_len else "the model's default max_model_len"
    needed = layout.bytes_needed(max_len)
    plan = replace(plan_memory(cfg, device, weight_bytes or 0), kv_needed=needed)
    overhead = ENGINE_OVERHEAD_BYTES[device.kind]
    kind = device.kind.upper()

    too_big = weight_bytes is not None and plan.weight_bytes + overhead > device.total_memory
    if too_big:
        findings.append(
            error(
                "weights-too-big",
                f"weights ({_gib(plan.weight_bytes)}) plus runtime (~{_gib(overhead)}) exceed this {kind}'s "
                f"{_gib(device.total_memory)}",
                "use a quantized checkpoint (AWQ/GPTQ), tensor_parallel_size over several devices, or a "
                "device with more memory",
            )
        )
    if plan.kv_budget <= 0:
        if not too_big:
            findings.append(
                error(
                    "kv-cache-none",
                    f"weights ({_gib(plan.weight_bytes)}) plus runtime (~{_gib(overhead)}) leave no room for "
                    f"the KV cache in the {_gib(plan.footprint)} this engine may use ({plan.budget_source})",
                    _raise_fix(plan, device) + f" (enough for {len_source} {max_len})",
                )
            )
        return plan, findings
    if needed > plan.kv_budget:
        largest = layout.largest_fitting(plan.kv_budget, max_len)
        shorten = f"set max_model_len: {largest} or less, or " if largest > 0 else ""
        findings.append(
            error(
                "kv-cache-too-small",
                f"one sequence of {len_source} {max_len} needs {_gib(needed)} of KV cache "
                f"({layout.describe(max_len)}), but the KV cache gets {_gib(plan.kv_budget)} "
                f"({plan.budget_source})",
                shorten + _raise_fix(plan, device),
            )
        )
    else:
        sequences = (plan.kv_budget - layout.reserved_bytes) // max(layout.sequence_bytes(max_len), 1)
        findings.append(
            info(
                "memory-summary",
                f"weights {_gib(plan.weight_bytes)}; KV cache {_gib(plan.kv_budget)} ({plan.budget_source}); "
                f"{layout.describe(max_len)}; max_model_len {max_len} fits ({sequences} full-length "
                "sequences)",
            )
        )
    if not too_big:  # otherwise the totals would only restate it
        findings.extend(_total_findings(plan, device, f"{len_source} {max_len}"))
    return plan, findings


def _total_findings(plan: MemoryPlan, device: DeviceFacts, length: str) -> list[Finding]:
    """Weights + KV cache + runtime against the device's memory, total and free now."""
    kind = device.kind.upper()
    overhead = ENGINE_OVERHEAD_BYTES[device.kind]
    if plan.footprint > device.total_memory:
        return [
            error(
                "memory-exceeds-device",
                f"weights {_gib(plan.weight_bytes)} + KV cache {_gib(plan.kv_budget)} + runtime "
                f"~{_gib(overhead)} = {_gib(plan.footprint)}, more than this {kind}'s "
                f"{_gib(device.total_memory)}",
                f"lower {plan.knob} (one {length} sequence needs {_gib(plan.kv_needed)}) or max_model_len, "
                "or use a quantized checkpoint or a device with more memory",
            )
        ]
    if plan.footprint <= device.available_memory:
        return []
    if plan.gpu_memory_utilization is not None:
        fix = (
            f"vLLM refuses to start when {plan.gpu_memory_utilization:g} of the {kind} memory is not "
            f"free: {_raise_fix(plan, device)} (enough for {length}), or free memory first"
        )
    else:
        fix = f"free memory before starting this expert, or lower {plan.knob}"
    return [
        warning(
            "memory-exceeds-available",
            f"the engine would take {_gib(plan.footprint)} but only {_gib(device.available_memory)} is "
            "available now (other processes hold the rest)",
            fix,
        )
    ]


def _mesh_fix(eager: list[MemoryPlan], device: DeviceFacts) -> str:
    """Concrete per-expert sizes that let the eager experts share the device, when there are any."""
    minimal = sum(p.minimal_footprint(device) for p in eager)
    if minimal > device.total_memory:
        return (
            f"even at their minimum (one max_model_len sequence each) they need {_gib(minimal)}: set "
            "load: lazy on some of them, or run some on another host"
        )
    if device.is_cpu:
        sizes = ", ".join(f"{p.expert_id}: {max(math.ceil(p.kv_needed / GiB), 1)}" for p in eager)
        return f"set kv_cache_space_gib per eager expert (e.g. {sizes}), or set load: lazy on some of them"
    sizes = ", ".join(
        f"{p.expert_id}: {_utilization_for(p.minimal_footprint(device), device):.2f}" for p in eager
    )
    return (
        f"set gpu_memory_utilization per eager expert (at least {sizes}), or set load: lazy on some of them"
    )


def check_mesh_memory(plans: list[MemoryPlan], device: DeviceFacts) -> list[Finding]:
    """The experts that load at start, together, against the machine; then the largest lazy one on top."""
    eager = [p for p in plans if p.eager]
    lazy = [p for p in plans if not p.eager]
    findings: list[Finding] = []
    total = sum(p.footprint for p in eager)
    parts = ", ".join(f"{p.expert_id} {_gib(p.footprint)}" for p in eager)
    kind = device.kind.upper()
    if len(eager) > 1 and total > device.total_memory:
        automatic = [p.expert_id for p in eager if p.gpu_memory_utilization is not None]
        why = f" ({', '.join(automatic)} size themselves as a share of the whole {kind})" if automatic else ""
        findings.append(
            error(
                "mesh-memory",
                f"the experts loaded at start need {_gib(total)} together ({parts}), more than this "
                f"{kind}'s {_gib(device.total_memory)}{why}",
                _mesh_fix(eager, device),
            )
        )
    elif eager and total > device.available_memory:
        findings.append(
            warning(
                "mesh-memory-available",
                f"the experts loaded at start need {_gib(total)} together ({parts}); "
                f"{_gib(device.available_memory)} is available now",
                "free memory before `expertmesh up`, or set load: lazy on some experts",
            )
        )
    if lazy and total <= device.total_memory:
        biggest = max(lazy, key=lambda p: p.footprint)
        if total + biggest.footprint > device.total_memory:
            findings.append(
                warning(
                    "mesh-lazy-memory",
                    f"loading the lazy expert {biggest.expert_id} ({_gib(biggest.footprint)}) on top of the "
                    f"eager ones ({_gib(total)}) exceeds this {kind}'s {_gib(device.total_memory)}",
                    f"lower {biggest.expert_id}'s KV cache, run it on another host, or let experts take "
                    "turns (load: lazy with idle_unload_after_s)",
                )
            )
    return findings
