"""Run the gateway: a pool of expert links, health SERVING while any expert is, hot reload.

Hot reload: on SIGHUP, or when the config file's modification time changes, the file is read
and validated again. A valid file replaces routing, fallbacks, classification, ejection
settings and replica addresses without dropping streams in flight (each request keeps the
config it started with; removed replicas close after their last stream). An invalid file is
rejected with the reason in the log and the running config is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from expertmesh import cpus
from expertmesh.config import ConfigError, MeshConfig, load_config
from expertmesh.contract import GATEWAY_SERVICE
from expertmesh.loop import freeze_heap, thaw_heap
from expertmesh.rpc import Health, enable_reflection
from expertmesh.runtime import Runtime
from expertmesh.telemetry import Identity, watch_replicas
from expertmesh.tls import gateway_server_certs
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .auth import TokenAuth, TokensFile
from .classify import Classifier
from .discovery import Discovery
from .openai_api.serve import start_http
from .pool import Pool
from .router import Router
from .servicer import GatewayServicer
from .tenants import Tenants

log = logging.getLogger(__name__)
WATCH_CONFIG_S = 1.0


async def _mirror_health(pool: Pool, health: Health) -> None:
    """Keep the gateway's own health in step with its experts: SERVING if any can serve."""
    serving: bool | None = None
    while True:
        now = any(link.serving for link in pool.links())
        if now != serving:
            serving = now
            await health.set(now)
        waits = [
            asyncio.create_task(e.wait()) for e in [pool.changed, *(link.changed for link in pool.links())]
        ]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()


async def _router(config: MeshConfig) -> Router:
    classifier = Classifier(config)
    await asyncio.to_thread(classifier.warm)  # load the language/embedding models before use
    return Router(config, classifier)


class Reloader:
    """Re-reads the config file on SIGHUP or when it changes; applies it only when valid."""

    def __init__(
        self,
        path: Path,
        servicer: GatewayServicer,
        discovery: Discovery,
        tokens: TokensFile | None = None,
    ) -> None:
        self.path = path
        self.servicer = servicer
        self.discovery = discovery
        self.pool = discovery.pool
        self.tokens = tokens
        self.requested = asyncio.Event()
        self._mtime = self._stat()

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    async def reload(self) -> bool:
        """Apply the file if it is valid; True when applied."""
        try:
            config = load_config(self.path)
        except ConfigError as e:
            log.error("config reload rejected, keeping the running config: %s", e)
            return False
        old = self.servicer.router.config
        if config.gateway != old.gateway:
            log.warning("config reload: gateway listen settings change only on restart")
        if (config.auth is None) != (old.auth is None) or config.internal_tls != old.internal_tls:
            log.warning("config reload: turning auth on or off and internal_tls change only on restart")
        if self.tokens is not None and config.auth is not None:
            self.tokens.tenants = set(config.auth.tenants)
        self.servicer.router = await _router(config)
        self.servicer.tenants.apply(config.auth)
        await self.discovery.apply(config)
        log.info(
            "config reloaded from %s: %d experts, fallbacks %s",
            self.path,
            len(config.experts),
            config.routing.fallbacks or "none",
        )
        return True

    async def run(self) -> None:
        """Reload on request (SIGHUP) or on a change of the file's modification time."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.requested.wait(), WATCH_CONFIG_S)
            await self.pool.reap()
            self.pool.refresh_security(self.servicer.router.config)
            mtime = self._stat()
            if self.requested.is_set() or mtime != self._mtime:
                self.requested.clear()
                self._mtime = mtime
                await self.reload()


async def serve(
    config: MeshConfig,
    config_path: Path | None = None,
    port: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the process exit code."""
    # Secrets first: a gateway with unusable tokens or certificates must not start at all.
    tokens_path = config.tokens_file()
    # Every tenant a token names must be declared in auth.tenants: a typo must not turn a
    # restricted caller into an unrestricted one.
    tenant_names = set(config.auth.tenants) if config.auth else set()
    tokens = TokensFile(tokens_path, tenant_names) if tokens_path else None
    certs = gateway_server_certs(config)
    gw = config.gateway
    runtime = Runtime(
        Identity("gateway"),
        gw.metrics_port,
        gw.host,
        config.limits.max_message_bytes,
        [TokenAuth(tokens)] if tokens else [],
        stop,
    )
    pool = Pool()
    discovery = Discovery(pool)  # expert addresses that are DNS names: a replica per address found
    await discovery.apply(config)
    watch_replicas(lambda: [link.row() for link in pool.links()])
    servicer = GatewayServicer(await _router(config), pool, Tenants(config.auth))
    freeze_heap()  # what start-up left (torch too, with the embeddings classifier)
    pb_grpc.add_GatewayServicer_to_server(servicer, runtime.server)
    health = Health(runtime.server, [GATEWAY_SERVICE])
    if gw.reflection:
        enable_reflection(runtime.server, [GATEWAY_SERVICE])
    await health.set(False)
    bound = runtime.bind(gw.host, gw.port if port is None else port, certs.credentials() if certs else None)
    await runtime.start()
    runtime.draining.append(health.close)  # NOT_SERVING, and the health Watch streams end
    if gw.http_port is not None:  # the OpenAI-compatible front, same routing path
        http = await start_http(config, servicer, pool, tokens, gw.http_port)
        runtime.draining.append(http.stop)
    runtime.closing += [discovery.close, pool.close]
    runtime.background(_mirror_health(pool, health))
    if tokens is not None:
        runtime.background(tokens.watch())
    if gw.reserved_cores:  # beside experts on one host, keep off their engines' cores
        runtime.background(cpus.keep_placed("gateway"))
    if config_path is not None:
        reloader = Reloader(config_path, servicer, discovery, tokens)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.requested.set)
        runtime.background(reloader.run())
    log.info(
        "gateway listening on %s:%d (%s, %s) for %d experts",
        gw.host,
        bound,
        ("mTLS" if gw.tls.client_ca_file else "TLS") if gw.tls else "plaintext",
        f"tokens from {tokens.path}" if tokens else "no auth",
        len(config.experts),
    )
    try:
        await runtime.serve(lambda: config.grace_period_s)
    finally:
        thaw_heap()  # serve() may run inside a larger process (tests): leave its heap as found
        log.info("gateway stopped")
    return 0
