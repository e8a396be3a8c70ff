"""TLS for every hop: server credentials that follow rotated certificate files, the gateway's
channel credentials towards experts, and the experts' peer-certificate check.

Server certificates are re-read without a restart: grpc asks :meth:`ServerCerts.fetch` for the
configuration at each new handshake; it looks at the files' modification times at most once a
second and hands grpc a new pair only once it has parsed it and checked that key and
certificate belong together. A broken file keeps the old pair in use, and the log says why.
Connections already open keep the pair they were made with. The gateway's client certificate
towards experts is followed by :meth:`expertmesh.gateway.pool.Pool.refresh_security`, which
renews every link when those files change.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from expertmesh.config import CertPair, ExpertConfig, MeshConfig
from expertmesh.guard import guard
from expertmesh.rpc import open_channel

log = logging.getLogger(__name__)
#: How often, at most, the certificate files' modification times are looked at.
RECHECK_S = 1.0
#: The expert RPCs that change its state or carry the gateway's traffic: only a peer with a
#: certificate from the mesh CA may call them.
PRIVILEGED_METHODS = frozenset(f"/expertmesh.v1.Expert/{name}" for name in ("Load", "Unload", "Multiplex"))


class TlsError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


def read_pem(path: str) -> bytes:
    """The file's bytes; :class:`TlsError` naming the file when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {path}: {e.strerror or e}") from None


def load_pair(pair: CertPair) -> tuple[bytes, bytes]:
    """``(key, chain)`` PEM bytes, checked: both parse and the key is the leaf certificate's."""
    chain, key = read_pem(pair.cert_file), read_pem(pair.key_file)
    try:
        leaf = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as e:
        raise TlsError(f"{pair.cert_file} is not a PEM certificate: {e}") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"{pair.key_file} is not an unencrypted PEM private key: {e}") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*der) != leaf.public_key().public_bytes(*der):
        raise TlsError(f"{pair.key_file} is not the key of the certificate in {pair.cert_file}")
    return key, chain


def load_ca(path: str) -> bytes:
    """PEM CA bytes, checked to hold at least one certificate."""
    data = read_pem(path)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(f"{path} is not a PEM CA certificate: {e}") from None
    return data


class ServerCerts:
    """A server's certificate pair (and client CA), re-read when the files change."""

    def __init__(self, pair: CertPair, client_ca_file: str | None = None) -> None:
        self.pair = pair
        self.client_ca_file = client_ca_file
        self._files = [f for f in (pair.cert_file, pair.key_file, client_ca_file) if f]
        self._stamp = self._mtimes()
        self._checked = time.monotonic()
        self.initial = self._configuration()  # raises TlsError: a server never starts on a bad pair
        self.rotations = 0

    def _mtimes(self) -> tuple[float, ...]:
        stamps = []
        for f in self._files:
            try:
                stamps.append(Path(f).stat().st_mtime)
            except OSError:
                stamps.append(0.0)
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        key, chain = load_pair(self.pair)
        ca = load_ca(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-config fetcher: a new configuration when the files changed, else None."""
        now = time.monotonic()
        if now - self._checked < RECHECK_S:
            return None
        self._checked = now
        stamp = self._mtimes()
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a broken file is reported once, not at every handshake
        try:
            config = self._configuration()
        except TlsError as e:
            log.error("certificate reload rejected, keeping the running certificate: %s", e)
            return None
        self.rotations += 1
        log.info("certificate reloaded from %s", self.pair.cert_file)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files; client certificates required with a client CA."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self.client_ca_file is not None
        )


def gateway_server_certs(config: MeshConfig) -> ServerCerts | None:
    """The gateway's certificates for callers (``gateway.tls``); None = plaintext."""
    tls = config.gateway.tls
    return ServerCerts(tls, tls.client_ca_file) if tls else None


def expert_server_certs(config: MeshConfig, expert_id: str) -> ServerCerts | None:
    """An expert's certificates under internal_tls: clients must show a mesh certificate."""
    pair = config.expert_cert(expert_id)
    if pair is None or config.internal_tls is None:
        return None
    return ServerCerts(pair, config.internal_tls.ca_file)


def link_security(
    config: MeshConfig, pair: CertPair | None = None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """Channel credentials towards experts and the channel options they need: the mesh CA and
    ``pair`` as the client certificate (default: the gateway's); plaintext without internal_tls."""
    internal, pair = config.internal_tls, pair or config.gateway_cert()
    if internal is None or pair is None:
        return None, []
    key, chain = load_pair(pair)
    credentials = grpc.ssl_channel_credentials(load_ca(internal.ca_file), key, chain)
    options = [("grpc.ssl_target_name_override", internal.server_name)] if internal.server_name else []
    return credentials, options


def probe_channel(
    config: MeshConfig, address: str, gateway: bool, extra: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel for ``expertmesh up`` to check one of its processes' health over its own TLS.

    Experts: the mesh CA and the gateway's certificate. The gateway: ``gateway.tls.ca_file`` (else
    the mesh CA) and, when the gateway requires client certificates, the gateway's own pair.
    """
    tls = config.gateway.tls
    if not gateway:
        credentials, options = link_security(config)
    elif tls is None:
        credentials, options = None, []
    else:
        ca = tls.ca_file or (config.internal_tls.ca_file if config.internal_tls else None)
        if ca is None:
            raise TlsError(
                "gateway.tls needs ca_file (or internal_tls) for `expertmesh up` to check its health"
            )
        pair = config.gateway_cert() if tls.client_ca_file else None
        key, chain = load_pair(pair) if pair else (None, None)
        credentials, options = grpc.ssl_channel_credentials(load_ca(ca), key, chain), []
    return open_channel(address, credentials, [*options, *(extra or [])])


def link_files(config: MeshConfig) -> tuple[float, ...]:
    """Modification times of the files :func:`link_security` reads (0 for a missing one)."""
    internal, pair = config.internal_tls, config.gateway_cert()
    if internal is None or pair is None:
        return ()
    stamps = []
    for f in (internal.ca_file, pair.cert_file, pair.key_file):
        try:
            stamps.append(Path(f).stat().st_mtime)
        except OSError:
            stamps.append(0.0)
    return tuple(stamps)


def client_credentials(
    cacert: str | None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for a caller: trust ``cacert`` (None: the system's), show ``cert``/``key``."""
    if (cert is None) != (key is None):
        raise TlsError("a client certificate needs both --cert and --key")
    chain = private = None
    if cert and key:
        private, chain = load_pair(CertPair(cert_file=cert, key_file=key))
    return grpc.ssl_channel_credentials(load_ca(cacert) if cacert else None, private, chain)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def insecure_bind_refusal(config: MeshConfig, expert: ExpertConfig) -> str | None:
    """Why this expert must not listen where it is configured to, or None when it may."""
    if config.internal_tls is not None or is_loopback(expert.host):
        return None
    if expert.allow_insecure or config.allow_insecure:
        log.warning(
            "expert %s listens on %s without TLS (allow_insecure): anyone who reaches it can call "
            "Load, Unload and Generate",
            expert.expert_id,
            expert.host,
        )
        return None
    return (
        f"expert {expert.expert_id} would listen on {expert.host} in plaintext: anyone who can reach "
        f"it could call Load, Unload and Generate. Configure internal_tls (mTLS between gateway and "
        f"experts), listen on 127.0.0.1, or set allow_insecure: true to accept the risk"
    )


def has_peer_certificate(context: grpc.aio.ServicerContext) -> bool:
    """True when the caller presented a certificate the server verified."""
    auth = context.auth_context() or {}
    return bool(auth.get("x509_pem_cert"))


class RequirePeerCertificate(grpc.aio.ServerInterceptor):
    """Experts under internal_tls: ``Load``, ``Unload`` and ``Multiplex`` answer only a peer that
    presented a certificate from the mesh CA (the server verified it against that CA)."""

    def __init__(self, methods: Sequence[str] = tuple(PRIVILEGED_METHODS)) -> None:
        self.methods = frozenset(methods)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def check(context: grpc.aio.ServicerContext) -> None:
            if not has_peer_certificate(context):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs a client certificate from the mesh CA (internal_tls)",
                )

        return guard(handler, check)
