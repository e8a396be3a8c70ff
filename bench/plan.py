"""What every scenario shares: the engine settings, the prompts and the load plan.

Fairness rests here: every scenario runs the same model with the same engine settings
(:class:`EngineSettings`), the same prompts and the same fixed output length (``ignore_eos``),
at the same concurrency levels (:class:`LoadPlan`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from expertmesh.config import ExpertConfig

#: The stream counts the issue asks for; ``--quick`` keeps all of them, with fewer requests.
CONCURRENCY = (1, 8, 32, 128)
#: Scenario names, in the order they are run and reported.
SCENARIOS = (
    "inprocess",
    "expert",
    "gateway",
    "gateway_openai",
    "gateway_tls",
    "relay",
    "up_expert",
    "up_gateway",
    "vllm_grpc",
    "vllm_openai",
)
#: Scenarios measured only when named (``--only``): the shipped topology's client placed
#: otherwise, and one expert alone under ``up`` (:mod:`bench.topology`).
EXTRA_SCENARIOS = (
    "up_expert_same",
    "up_gateway_same",
    "up_expert_placed",
    "up_gateway_placed",
    "alone_expert",
    "alone_gateway",
    "affinity_prefix",
    "affinity_none",
)
#: Every scenario, in the order they are reported.
ALL_SCENARIOS = SCENARIOS + EXTRA_SCENARIOS
#: Trials per level in a full run; the best is reported. A trial is 2-6 s, and on a shared
#: two-core box one scenario's trials differ by up to 25 %: with two, a ratio of two scenarios
#: moved by as much from run to run.
FULL_TRIALS = 4
#: The id and domain of the expert that the mesh scenarios start.
EXPERT_ID = "bench"
EXPERT_DOMAIN = "general"

_PROMPT = (
    "Request {i}: summarise the following notes for the operations team. The gateway routes each "
    "request to an expert, watches its health and streams the answer back token by token."
)


@dataclass(frozen=True)
class EngineSettings:
    """One set of vLLM engine settings, applied to every scenario (in-process, expert, vLLM's servers)."""

    model: str
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    kv_cache_space_gib: int = 1
    enforce_eager: bool = True
    # vLLM's own defaults on CPU for its servers; pinned so that no usage context changes them.
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    seed: int = 0

    def expert_config(self, expert_id: str = EXPERT_ID, domain: str = EXPERT_DOMAIN) -> ExpertConfig:
        """The expert (and in-process engine) config with exactly these settings."""
        return ExpertConfig(
            expert_id=expert_id,
            domain=domain,
            model_path=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            kv_cache_space_gib=self.kv_cache_space_gib,
            enforce_eager=self.enforce_eager,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            engine_args={"max_num_batched_tokens": self.max_num_batched_tokens},
        )

    def vllm_cli_args(self) -> list[str]:
        """The same settings as command-line flags of vLLM's own servers."""
        args = [
            "--model",
            self.model,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--seed",
            str(self.seed),
            "--disable-log-stats",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args

    def env(self) -> dict[str, str]:
        """Environment for every engine process (read by vLLM's CPU backend at start)."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib)}


@dataclass(frozen=True)
class LoadPlan:
    """How much load each scenario gets: requests per concurrency level and the output length."""

    requests: dict[int, int]
    max_tokens: int = 64
    temperature: float = 0.0
    warmup_requests: int = 8
    warmup_max_tokens: int = 8
    trials: int = 1
    #: Before each trial, wait up to this long for the machine to be quiet (0: do not wait).
    quiet_wait_s: float = 0.0
    prompts: tuple[str, ...] = field(default=())

    @classmethod
    def quick(cls) -> LoadPlan:
        """Smoke size: one wave of requests per concurrency level (a CI-sized run)."""
        return cls.for_rounds({1: 2, 8: 1, 32: 1, 128: 1}, warmup_requests=8, trials=1)

    @classmethod
    def full(cls) -> LoadPlan:
        """The measurement: a few seconds of steady load per level, best of ``FULL_TRIALS`` trials."""
        plan = cls.for_rounds({1: 16, 8: 16, 32: 12, 128: 8}, warmup_requests=64, trials=FULL_TRIALS)
        return replace(plan, quiet_wait_s=10.0)

    @classmethod
    def for_rounds(cls, rounds: dict[int, int], warmup_requests: int, trials: int) -> LoadPlan:
        """``rounds[c]`` waves of ``c`` requests at concurrency ``c``; distinct prompts per request."""
        requests = {c: c * n for c, n in rounds.items()}
        count = max(max(requests.values()), warmup_requests)
        # Distinct prompts (the index leads) so that no request rides on another's prefix cache.
        prompts = tuple(_PROMPT.format(i=i) for i in range(count))
        return cls(requests=requests, warmup_requests=warmup_requests, trials=trials, prompts=prompts)

    @property
    def concurrency(self) -> list[int]:
        """The concurrency levels, lowest first."""
        return sorted(self.requests)

    def levels(self) -> list[tuple[int, int]]:
        """(concurrency, trial) in the order they are measured: every trial of a level, then the next."""
        return [(c, t) for c in self.concurrency for t in range(self.trials)]

    def describe(self) -> dict[str, Any]:
        """The plan for the results file (without the prompt texts)."""
        d = asdict(self)
        d["requests"] = {str(c): n for c, n in self.requests.items()}
        d["prompts"] = {"count": len(self.prompts), "first": self.prompts[0] if self.prompts else ""}
        return d


def default_model() -> Path:
    """The tiny Llama demo model, built locally if missing (so a fresh clone can run the bench)."""
    from expertmesh.demo_models import ensure_demo_models

    general, *_ = ensure_demo_models(log=True)
    return general
