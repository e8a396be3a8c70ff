"""The mesh configuration: one file, modelled once, used by every process.

The file is YAML or JSON. It accepts the original system's JSON shape unchanged
(``{"experts": [{"expert_id", "model_path", "domain", "quantization", "dtype",
"max_model_len", ...}]}``) and adds mesh-level settings with defaults.

Which file is used is decided by :func:`resolve_config_path`; the choice and its reason
are always reported, and a missing file is an error, never a silent fallback.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from expertmesh.security_config import AuthConfig, CertPair, InternalTlsConfig, TenantConfig, TlsConfig
from expertmesh.security_config import Strict as _Strict

#: Environment variables that name the config file, highest precedence first.
CONFIG_ENV_VARS = ("EXPERTMESH_CONFIG", "VLLM_CONFIG_PATH")
#: The config used when neither the flag nor an environment variable names one.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
#: Names the gateway's tokens file; beats ``auth.tokens_file`` (e.g. a mounted Kubernetes Secret).
TOKENS_FILE_ENV = "EXPERTMESH_TOKENS_FILE"


class ConfigError(Exception):
    """The mesh config cannot be used; the message names the file and the problem."""


class ExpertConfig(_Strict):
    """One expert: one process, one vLLM engine, one model."""

    expert_id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Unique id, used to pin requests.")
    model_path: str = Field(description="Model directory (or hub id on a host that can reach a hub).")
    domain: str = Field(description="Requests for this domain are routed here.")
    description: str = ""
    quantization: str | None = Field(default=None, description="vLLM quantization method, e.g. awq.")
    dtype: str = Field(default="auto", description="auto, float32, float16 or bfloat16.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length; None = model's own.")
    tokenizer: str | None = None
    trust_remote_code: bool = False
    max_num_seqs: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    kv_cache_space_gib: int | None = Field(
        default=None, gt=0, description="CPU hosts: KV cache size (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    tensor_parallel_size: int = Field(default=1, gt=0)
    enforce_eager: bool | None = None
    seed: int = 0
    chat_template: str | None = Field(default=None, description="Jinja template for models without one.")
    system_prompt: str | None = Field(
        default=None, description="System turn put first in chat requests (messages) that have none."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Further vllm AsyncEngineArgs fields, passed as given."
    )
    host: str = Field(default="127.0.0.1", description="Interface the expert listens on.")
    port: int | None = Field(default=None, ge=0, le=65535, description="Listen port; None = assigned.")
    address: str | None = Field(default=None, description="host:port the gateway dials; default host:port.")
    replicas: list[str] = Field(
        default_factory=list,
        description="host:port of further replicas run elsewhere; the gateway balances over all of them.",
    )
    local_replicas: int = Field(
        default=1, ge=1, le=64, description="up runs this many processes of it here, on consecutive ports."
    )
    load: Literal["eager", "lazy"] = Field(
        default="eager", description="eager: load at start; lazy: load on the first request."
    )
    idle_unload_after_s: float | None = Field(
        default=None, gt=0, description="Release the engine after this long without requests (back to COLD)."
    )
    max_queue: int | None = Field(
        default=None,
        gt=0,
        description="Requests the engine may hold (running + waiting); more get RESOURCE_EXHAUSTED.",
    )
    memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Memory a load adds, for memory_budget_gib; default: measured, else estimated. "
        "`deploy k8s` sizes pods with it where the model folder is not readable.",
    )
    metrics_port: int | None = Field(
        default=None, gt=0, le=65535, description="Prometheus /metrics port on host; None = off."
    )
    stream_interval: Literal["auto"] | int = Field(
        default="auto",
        description="Tokens per streamed message: a number, or auto (1, up to 16 as streams grow).",
    )
    reserved_cores: bool = Field(
        default=True,
        description="Run the server and vLLM's engine core on the cores vLLM's CPU workers leave free.",
    )
    stall_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        description="Engine watchdog: requests waiting and no engine output for this long -> the expert "
        "reports NOT_SERVING, ends them UNAVAILABLE and exits to be restarted; None = off.",
    )
    max_streams_per_link: int = Field(
        default=2048, gt=0, description="Streams one gateway may open at once on one multiplexed call."
    )
    internal_cert: CertPair | None = Field(
        default=None, description="This expert's own certificate pair; default: internal_tls's."
    )
    allow_insecure: bool = Field(
        default=False, description="Listen on a non-loopback host without internal_tls (plaintext)."
    )

    @field_validator("stream_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"stream_interval must be 'auto' or a whole number of tokens >= 1, got {value!r}")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = {"auto", "float32", "float16", "bfloat16", "half", "float"}
        if value not in allowed:
            raise ValueError(f"dtype {value!r} is not one of {sorted(allowed)}")
        return value


class DomainRules(_Strict):
    """What makes the gateway classify a prompt into one domain (see README, "Routing")."""

    keywords: list[str] = Field(default_factory=list, description="Whole words, case-insensitive.")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions (Python re).")
    code: bool = Field(default=False, description="Prompts that contain code belong here.")
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


class GatewayConfig(_Strict):
    """Where the gateway listens."""

    host: str = Field(default="0.0.0.0", description="Interface the gateway listens on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Its gRPC port.")
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="OpenAI-compatible HTTP API (/v1/chat/completions, ...) on host; None = off.",
    )
    metrics_port: int | None = Field(
        default=None, gt=0, le=65535, description="Prometheus /metrics port on host; None = off."
    )
    reserved_cores: bool = Field(
        default=True, description="Run on the cores vLLM's CPU workers on this host leave free."
    )
    max_concurrent_streams: int = Field(
        default=1024,
        gt=0,
        description="Generate streams the gateway serves at once; more: RESOURCE_EXHAUSTED.",
    )
    max_streams_per_peer: int = Field(
        default=256, gt=0, description="Generate streams one client address may have open at once."
    )

    tls: TlsConfig | None = Field(default=None, description="TLS for callers; None = plaintext.")
    internal_cert: CertPair | None = Field(
        default=None, description="The gateway's client certificate towards experts; default: internal_tls's."
    )
    reflection: bool = Field(default=True, description="Serve gRPC server reflection.")

    @model_validator(mode="after")
    def _distinct_ports(self) -> GatewayConfig:
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"gateway.http_port {self.http_port} is also gateway.port")
        return self


MIB = 1024 * 1024


class LimitsConfig(_Strict):
    """Sizes every server, channel and request is held to (gateway and experts alike)."""

    max_message_bytes: int = Field(
        default=4 * MIB, ge=64 * 1024, description="gRPC receive and send limit of every server and channel."
    )
    link_batch_bytes: int = Field(
        default=MIB,
        ge=16 * 1024,
        description="A batch of frames on the gateway-expert link stops growing here.",
    )
    max_request_bytes: int = Field(
        default=MIB, ge=1024, description="A GenerateRequest larger than this (serialized) is refused."
    )
    max_messages: int = Field(default=256, gt=0, description="Chat turns per request.")
    stream_buffer_messages: int = Field(
        default=512,
        ge=128,  # one batch from the expert may carry 128 frames of one stream
        description="Messages the gateway holds for one caller that does not read; then RESOURCE_EXHAUSTED.",
    )

    @model_validator(mode="after")
    def _fits(self) -> LimitsConfig:
        # A request travels inside one link message: it must fit with room for the frame around it.
        if self.max_request_bytes + 64 * 1024 > self.max_message_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must be at least 64 KiB below "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        if self.link_batch_bytes > self.max_message_bytes:
            raise ValueError(
                f"link_batch_bytes ({self.link_batch_bytes}) must not exceed "
                f"max_message_bytes ({self.max_message_bytes})"
            )
        return self


class MeshConfig(_Strict):
    """The whole mesh: gateway settings and the experts behind it."""

    default_domain: str | None = Field(
        default=None, description="Domain for requests that name none; default: the first expert's."
    )
    gateway: GatewayConfig = GatewayConfig()
    expert_base_port: int = Field(
        default=50051, gt=0, le=65535, description="First port for experts without one."
    )
    grace_period_s: float = Field(default=10.0, ge=0, description="Time allowed for graceful shutdown.")
    max_restarts: int = Field(
        default=5, ge=0, description="Supervisor: restarts of a crashed process before giving up."
    )
    memory_budget_gib: float | None = Field(
        default=None,
        gt=0,
        description="Resident memory of all experts of this host together; an on-demand load that "
        "would exceed it first unloads the least recently used idle expert.",
    )
    unresponsive_restart_s: float | None = Field(
        default=30.0,
        gt=0,
        description="Supervisor: a child that served and then answers no health check for this long is "
        "killed and restarted; None = off.",
    )
    session_nice: int | None = Field(
        default=10,
        ge=0,
        le=19,
        description="Supervisor: nice of the scheduling group of up's session (autogroup), so that "
        "clients in other sessions are not starved by the engines; None = left as it is.",
    )
    limits: LimitsConfig = LimitsConfig()
    routing: RoutingConfig = RoutingConfig()
    internal_tls: InternalTlsConfig | None = Field(
        default=None, description="mTLS between the gateway and the experts; None = plaintext."
    )
    allow_insecure: bool = Field(
        default=False, description="Every expert may listen on a non-loopback host without internal_tls."
    )
    auth: AuthConfig | None = Field(default=None, description="Token auth and tenants at the gateway.")
    experts: list[ExpertConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> MeshConfig:
        # Every problem at once: an operator should not fix them one restart at a time.
        problems = []
        ids = [e.expert_id for e in self.experts]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            problems.append(f"duplicate expert_id: {', '.join(dupes)}")
        ports = [p for i in range(len(self.experts)) for p in self.replica_ports(i) if p]
        dupe_ports = sorted({p for p in ports if ports.count(p) > 1})
        if dupe_ports:
            problems.append(f"duplicate expert port: {', '.join(map(str, dupe_ports))}")
        for i, e in enumerate(self.experts):
            if self.gateway.port in self.replica_ports(i) and e.host in (
                self.gateway.host,
                "0.0.0.0",
                "127.0.0.1",
            ):
                problems.append(f"expert port {self.gateway.port} is also the gateway port")
        if self.default_domain is not None and self.default_domain not in self.domains():
            problems.append(
                f"default_domain {self.default_domain!r} has no expert (domains: {', '.join(self.domains())})"
            )
        for domain in self.routing.domains:
            if domain not in self.domains():
                problems.append(f"routing.domains names domain {domain!r}, which has no expert")
        names = set(ids) | set(self.domains())
        for domain, chain in self.routing.fallbacks.items():
            if domain not in self.domains():
                problems.append(f"routing.fallbacks names domain {domain!r}, which has no expert")
            unknown = [n for n in chain if n not in names]
            if unknown:
                problems.append(
                    f"routing.fallbacks[{domain!r}] names {', '.join(map(repr, unknown))}: "
                    f"neither a domain nor an expert_id of this mesh"
                )
        for name, tenant in (self.auth.tenants if self.auth else {}).items():
            unknown = [d for d in tenant.domains if d not in self.domains()]
            if unknown:
                problems.append(
                    f"auth.tenants[{name!r}].domains names {', '.join(map(repr, unknown))}: not a domain "
                    f"of this mesh (domains: {', '.join(self.domains())})"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def expert_cert(self, expert_id: str) -> CertPair | None:
        """The certificate pair the expert presents: its own, else internal_tls's; None = plaintext."""
        if self.internal_tls is None:
            return None
        return self.expert(expert_id).internal_cert or self.internal_tls

    def gateway_cert(self) -> CertPair | None:
        """The gateway's client certificate towards experts; None without internal_tls."""
        if self.internal_tls is None:
            return None
        return self.gateway.internal_cert or self.internal_tls

    def tokens_file(self, environ: dict[str, str] | None = None) -> str | None:
        """The tokens file: EXPERTMESH_TOKENS_FILE, else auth.tokens_file; None = auth off."""
        env = os.environ if environ is None else environ
        return env.get(TOKENS_FILE_ENV) or (self.auth.tokens_file if self.auth else None)

    def domains(self) -> list[str]:
        """Configured domains in first-seen order."""
        return list(dict.fromkeys(e.domain for e in self.experts))

    def effective_default_domain(self) -> str:
        """The domain used when a request names none."""
        return self.default_domain or self.experts[0].domain

    def expert(self, expert_id: str) -> ExpertConfig:
        """The expert with this id; KeyError when none."""
        for e in self.experts:
            if e.expert_id == expert_id:
                return e
        raise KeyError(expert_id)

    def expert_port(self, index: int) -> int:
        """Listen port of the expert at ``index`` (its first local replica): its own, else the
        base port plus the local replicas of the experts before it."""
        port = self.experts[index].port
        if port is not None:
            return port
        return self.expert_base_port + sum(e.local_replicas for e in self.experts[:index])

    def replica_ports(self, index: int) -> list[int]:
        """The ports of the expert's local replicas (consecutive; [0] while port 0 = assigned)."""
        first = self.expert_port(index)
        return [first] if first == 0 else [first + r for r in range(self.experts[index].local_replicas)]

    def expert_address(self, index: int, replica: int = 0) -> str:
        """The ``host:port`` the gateway dials for the expert at ``index`` (its local ``replica``)."""
        e = self.experts[index]
        if e.address and replica == 0:
            return e.address
        host = "127.0.0.1" if e.host in ("0.0.0.0", "::", "") else e.host
        return f"{host}:{self.replica_ports(index)[replica]}"

    def local_addresses(self, index: int) -> list[str]:
        """Every local replica's address of the expert at ``index``."""
        return [self.expert_address(index, r) for r in range(len(self.replica_ports(index)))]


@dataclass(frozen=True)
class ConfigSource:
    """Which file was chosen and why (``--config``, an environment variable, or the default)."""

    path: Path
    reason: str

    def describe(self) -> str:
        """One line for logs: ``config: /path (from --config)``."""
        return f"config: {self.path} (from {self.reason})"


def resolve_config_path(
    flag: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> ConfigSource:
    """Pick the config file: ``--config`` > EXPERTMESH_CONFIG > VLLM_CONFIG_PATH > default."""
    env = os.environ if environ is None else environ
    if flag:
        return ConfigSource(Path(flag), "--config")
    for name in CONFIG_ENV_VARS:
        if env.get(name):
            return ConfigSource(Path(env[name]), name)
    return ConfigSource(DEFAULT_CONFIG, "default")


def _closest(key: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


_SECTIONS: dict[str, type[BaseModel]] = {
    "gateway": GatewayConfig,
    "routing": RoutingConfig,
    "limits": LimitsConfig,
    "internal_tls": InternalTlsConfig,
    "auth": AuthConfig,
}
_SUBSECTIONS: dict[str, type[BaseModel]] = {"domains": DomainRules, "tenants": TenantConfig}
#: Sections one level down that are a model of their own (``gateway.tls.x``).
_NESTED: dict[tuple[str, str], type[BaseModel]] = {
    ("gateway", "tls"): TlsConfig,
    ("gateway", "internal_cert"): CertPair,
    ("experts", "internal_cert"): CertPair,
}


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            model: type[BaseModel] = MeshConfig
            nested = (str(e["loc"][0]), str(e["loc"][-2])) if len(e["loc"]) > 2 else None
            if nested in _NESTED:
                model = _NESTED[nested]
            elif len(e["loc"]) > 1 and e["loc"][0] == "experts":
                model = ExpertConfig
            elif len(e["loc"]) > 3 and e["loc"][1] in _SUBSECTIONS:
                model = _SUBSECTIONS[str(e["loc"][1])]
            elif len(e["loc"]) > 1 and e["loc"][0] in _SECTIONS:
                model = _SECTIONS[str(e["loc"][0])]
            lines.append(f"  unknown key {loc!r}{_closest(key, list(model.model_fields))}")
        elif e["type"] == "value_error":
            for line in e["msg"].removeprefix("Value error, ").splitlines():
                lines.append(f"  {loc or '(top level)'}: {line}")
        else:
            lines.append(f"  {loc or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def parse_config(text: str, path: Path) -> MeshConfig:
    """Parse and validate config text; ``path`` names the file in errors and anchors relative paths."""
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON in {path} at line {e.lineno} column {e.colno}: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping with an 'experts' list")
    try:
        config = MeshConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e)) from e
    return _anchor_paths(config, path.resolve().parent)


def _anchor_paths(config: MeshConfig, base: Path) -> MeshConfig:
    """Resolve relative model paths against the config file's folder, not the cwd.

    A relative value that is neither ``./``-style nor an existing folder there is kept as
    given, so hub ids (``org/name``) still reach vLLM on hosts that can download.
    """
    experts = []
    for e in config.experts:
        given = Path(e.model_path).expanduser()
        anchored = given if given.is_absolute() else base / given
        if given.is_absolute() or e.model_path.startswith((".", "~")) or anchored.exists():
            e = e.model_copy(update={"model_path": str(anchored.resolve())})
        experts.append(e)
    return _anchor_security(config.model_copy(update={"experts": experts}), base)


def _anchor_security(config: MeshConfig, base: Path) -> MeshConfig:
    """Certificate, key and tokens paths relative to the config file's folder, as model paths are."""

    def fix(model: Any) -> Any:
        if model is None:
            return None
        update = {}
        for name in ("cert_file", "key_file", "ca_file", "client_ca_file", "tokens_file"):
            value = getattr(model, name, None)
            if value:
                update[name] = str((base / Path(value).expanduser()).resolve())
        return model.model_copy(update=update)

    gateway = config.gateway.model_copy(
        update={"tls": fix(config.gateway.tls), "internal_cert": fix(config.gateway.internal_cert)}
    )
    experts = [e.model_copy(update={"internal_cert": fix(e.internal_cert)}) for e in config.experts]
    return config.model_copy(
        update={
            "gateway": gateway,
            "experts": experts,
            "internal_tls": fix(config.internal_tls),
            "auth": fix(config.auth),
        }
    )


def load_config(source: ConfigSource | str | os.PathLike[str]) -> MeshConfig:
    """Read and validate a mesh config file; raises :class:`ConfigError` naming the file."""
    path = source.path if isinstance(source, ConfigSource) else Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    return parse_config(text, path)


def load_resolved(flag: str | os.PathLike[str] | None = None) -> tuple[MeshConfig, ConfigSource]:
    """Resolve the config path by precedence, load it, and say on stderr which file is used."""
    source = resolve_config_path(flag)
    config = load_config(source)
    print(source.describe(), file=sys.stderr, flush=True)
    return config, source
