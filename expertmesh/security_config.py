"""The security part of the mesh config (TLS, mTLS inside the mesh, tokens and tenants), and the
strict base every config model shares; :mod:`expertmesh.config` holds the rest and loads files."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Base of every config model."""

    # Unknown keys are errors: the original server silently ignored what it did not know.
    model_config = ConfigDict(extra="forbid", frozen=True)


class CertPair(Strict):
    """A certificate chain and its private key (PEM files), as one process presents them."""

    cert_file: str = Field(description="PEM certificate chain, leaf first.")
    key_file: str = Field(description="PEM private key of the leaf certificate.")


class TlsConfig(CertPair):
    """TLS on the gateway's port for callers; ``client_ca_file`` also requires client certificates."""

    client_ca_file: str | None = Field(
        default=None, description="PEM CA(s) whose client certificates callers must present (mTLS)."
    )
    ca_file: str | None = Field(
        default=None,
        description="CA that issued cert_file; lets `expertmesh up` check the gateway's health over "
        "TLS (default: internal_tls.ca_file).",
    )


class InternalTlsConfig(CertPair):
    """mTLS between the gateway and the experts: one mesh CA; each side shows a certificate from it."""

    ca_file: str = Field(description="PEM CA of the mesh: experts accept only clients it issued.")
    server_name: str | None = Field(
        default=None,
        description="Name the gateway checks in experts' certificates; default: the host dialled.",
    )


class TenantConfig(Strict):
    """What one tenant's tokens may do at the gateway."""

    domains: list[str] = Field(
        default_factory=list, description="Domains it may reach; empty = every domain."
    )
    max_concurrent_streams: int | None = Field(
        default=None, gt=0, description="Streams at once; None = no bound."
    )
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="Prompt + completion tokens per minute; None = no bound."
    )


class AuthConfig(Strict):
    """Bearer-token authentication at the gateway, and what each tenant may do."""

    tokens_file: str | None = Field(
        default=None,
        description="One `TOKEN [TENANT]` a line (env EXPERTMESH_TOKENS_FILE overrides); re-read on change.",
    )
    tenants: dict[str, TenantConfig] = Field(
        default_factory=dict, description="Tenant name -> limits; a token without a tenant is 'default'."
    )
    rate_window_s: float = Field(
        default=60.0,
        gt=0,
        description="The sliding window tokens_per_minute is counted over (its budget scales with it).",
    )
