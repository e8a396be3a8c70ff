"""Preflight of the security settings: certificates, keys, CAs and tokens load, and no expert
would listen in plaintext where it must not. The servers make the same checks at start and
refuse to start; here every problem shows at once, before anything loads."""

from __future__ import annotations

from pathlib import Path

from expertmesh.config import CertPair, MeshConfig
from expertmesh.preflight.findings import Finding, error
from expertmesh.tls import TlsError, insecure_bind_refusal, load_ca, load_pair


def _pair(code: str, what: str, pair: CertPair) -> list[Finding]:
    try:
        load_pair(pair)
    except TlsError as e:
        return [error(code, f"{what}: {e}", "point cert_file/key_file at a PEM certificate and its own key")]
    return []


def _ca(code: str, what: str, path: str | None) -> list[Finding]:
    if not path:
        return []
    try:
        load_ca(path)
    except TlsError as e:
        return [error(code, f"{what}: {e}", "point it at the PEM certificate of the CA")]
    return []


def check_expert_security(config: MeshConfig, expert_id: str) -> list[Finding]:
    """An expert's certificate pair, and whether it may listen where it is configured to."""
    expert = config.expert(expert_id)
    findings = []
    refusal = insecure_bind_refusal(config, expert)
    if refusal:
        findings.append(error("insecure-listen", refusal, "configure internal_tls, or allow_insecure: true"))
    pair = config.expert_cert(expert_id)
    if pair is not None:
        findings += _pair("tls-expert-cert", f"expert {expert_id} certificate", pair)
    return findings


def check_mesh_security(config: MeshConfig) -> list[Finding]:
    """The gateway's certificates, the mesh CA and the tokens file."""
    from expertmesh.gateway.auth import TokensError, TokensFile

    findings = []
    tls = config.gateway.tls
    if tls is not None:
        findings += _pair("tls-gateway-cert", "gateway.tls", tls)
        findings += _ca("tls-client-ca", "gateway.tls.client_ca_file", tls.client_ca_file)
        findings += _ca("tls-gateway-ca", "gateway.tls.ca_file", tls.ca_file)
    if config.internal_tls is not None:
        findings += _ca("tls-mesh-ca", "internal_tls.ca_file", config.internal_tls.ca_file)
        pair = config.gateway_cert()
        if pair is not None:
            findings += _pair("tls-gateway-link-cert", "the gateway's certificate towards experts", pair)
    tokens = config.tokens_file()
    if tokens:
        try:
            TokensFile(Path(tokens), set(config.auth.tenants) if config.auth else set())
        except TokensError as e:
            findings.append(
                error("tokens-file", str(e), "one `TOKEN [TENANT]` a line, tenants from auth.tenants")
            )
    return findings
