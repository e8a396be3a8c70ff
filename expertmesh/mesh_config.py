"""The whole mesh config (``MeshConfig``) and its ``gateway`` and ``limits`` sections (part of
the one config model, :mod:`expertmesh.config`, which also loads it)."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from expertmesh.expert_config import ExpertConfig
from expertmesh.routing_config import RoutingConfig
from expertmesh.security_config import AuthConfig, CertPair, InternalTlsConfig, TlsConfig
from expertmesh.security_config import Strict as _Strict

#: Names the gateway's tokens file; beats ``auth.tokens_file`` (e.g. a mounted Kubernetes Secret).
TOKENS_FILE_ENV = "EXPERTMESH_TOKENS_FILE"


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
