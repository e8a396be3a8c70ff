"""The mesh config's ``routing`` section: classification rules, fallbacks, failover and
ejection (part of the one config model, :mod:`expertmesh.config`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from expertmesh.security_config import Strict as _Strict


class DomainRules(_Strict):
    """What makes the gateway classify a prompt into one domain (see README, "Routing")."""

    keywords: list[str] = Field(default_factory=list, description="Whole words, case-insensitive.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions (Python re).")
    code: bool = Field(
        default=False, description="Prompts that contain code belong here (one domain at most)."
    )
    non_english: bool = Field(default=False, description="Prompts not in English belong here.")
    examples: list[str] = Field(default_factory=list, description="Example prompts for the embedding signal.")
    resume: Literal["same_model", "any", "off"] | None = Field(
        default=None, description="This domain's routing.resume, when it differs from the mesh's."
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
        return value


class RoutingConfig(_Strict):
    """How the gateway chooses among experts and what it does when one fails."""

    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="domain -> ordered domains (or expert ids) to try when its experts cannot serve.",
    )
    domains: dict[str, DomainRules] = Field(
        default_factory=dict, description="Automatic classification rules per domain."
    )
    threshold: float = Field(
        default=0.5, ge=0, le=1, description="Below this confidence a request goes to the default domain."
    )
    embeddings: bool = Field(
        default=False, description="Use the all-MiniLM-L6-v2 embedding signal (needs the embeddings extra)."
    )
    eject_after_failures: int = Field(default=3, gt=0, description="Consecutive failures that eject.")
    eject_base_s: float = Field(default=5.0, gt=0, description="First ejection time; doubles each time.")
    loading_policy: Literal["wait", "fallback_while_loading"] = Field(
        default="wait", description="A lazy expert that is not loaded: wait for it, or serve from a fallback."
    )
    load_wait_s: float = Field(default=300.0, gt=0, description="How long to wait for a lazy expert to load.")
    resume: Literal["same_model", "any", "off"] = Field(
        default="same_model",
        description="A stream whose replica fails after its first tokens continues on another replica "
        "of the same model (same_model), on any candidate (any, re-tokenized), or ends (off).",
    )
    max_resumes: int = Field(default=2, ge=0, description="Resumes of one stream at most.")
    hedge_after_ms: float | None = Field(
        default=None,
        gt=0,
        description="No first token after this long: a second attempt on another replica; the first "
        "to answer is kept, the other cancelled. None = off.",
    )
    first_token_timeout_s: float | None = Field(
        default=30.0,
        gt=0,
        description="Per attempt at a loaded engine: no first message after this long -> the next candidate.",
    )
    eject_max_s: float = Field(
        default=300.0, gt=0, description="Longest ejection (Envoy's max_ejection_time)."
    )
    eject_decay_s: float = Field(
        default=60.0, gt=0, description="Each such stretch without an ejection forgets one past ejection."
    )
    max_ejection_percent: float = Field(
        default=50.0, ge=0, le=100, description="At most this share of an expert's replicas ejected at once."
    )
    affinity: Literal["prefix", "session", "none"] = Field(
        default="none",
        description="Replica choice within an expert: prefix = where the prompt's first blocks were "
        "seen (vLLM's prefix cache), session = by x-session-id metadata, none = least outstanding.",
    )
    affinity_prefix_chars: int = Field(
        default=1024, gt=0, description="affinity prefix: characters of the prompt (or chat turns) hashed."
    )
    affinity_balance: float = Field(
        default=1.25,
        ge=1.0,
        description="affinity: a replica takes its keys' requests while its outstanding requests stay "
        "within this factor of the average (+1); beyond it, least outstanding.",
    )
    classify_budget_ms: float = Field(
        default=20.0, gt=0, description="Time classification may take; then the default domain, with why."
    )
    dns_refresh_s: float = Field(
        default=30.0,
        gt=0,
        description="An expert address that is a DNS name (a headless Service) is resolved again after "
        "its records' TTL, and at least this often; each address found is one replica.",
    )
    dns_nameservers: list[str] = Field(
        default_factory=list,
        description="DNS servers (host or host:port) for those names; empty = the system's (resolv.conf).",
    )

    @model_validator(mode="after")
    def _one_code_domain(self) -> RoutingConfig:
        # The code signal votes for one domain: a second would never get its vote.
        code = [name for name, rules in self.domains.items() if rules.code]
        if len(code) > 1:
            raise ValueError(
                f"code: true is set on {len(code)} domains ({', '.join(code)}); at most one may have it"
            )
        return self
