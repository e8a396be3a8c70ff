"""uvicorn for the HTTP front, on the gateway's event loop, TLS as on the gRPC port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn

from expertmesh.config import MeshConfig

from ..auth import TokensFile
from ..pool import Pool
from ..servicer import GatewayServicer
from .app import OpenAIFront

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's stop event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class HttpFront:
    """The running HTTP server: ``port`` is the bound one; :meth:`stop` drains it."""

    def __init__(self, server: _Server, task: asyncio.Task[None], port: int) -> None:
        self.server = server
        self.task = task
        self.port = port

    async def stop(self) -> None:
        """Stop accepting, let open streams end (up to the grace period), close."""
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


async def start_http(
    config: MeshConfig,
    servicer: GatewayServicer,
    pool: Pool,
    tokens: TokensFile | None,
    port: int,
) -> HttpFront:
    """Bind ``gateway.host:port`` (an error here stops the gateway's start) and serve."""
    gw = config.gateway
    tls = gw.tls
    settings = uvicorn.Config(
        OpenAIFront(servicer, pool, tokens).app(),
        lifespan="off",
        log_config=None,  # the gateway's logging as configured
        access_log=False,
        timeout_graceful_shutdown=int(config.grace_period_s) or 1,
        ssl_certfile=tls.cert_file if tls else None,
        ssl_keyfile=tls.key_file if tls else None,
        ssl_ca_certs=tls.client_ca_file if tls else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca_file else ssl.CERT_NONE,
    )
    sock = _listen(gw.host, port)
    bound = int(sock.getsockname()[1])
    server = _Server(settings)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("OpenAI-compatible HTTP API on %s:%d (%s)", gw.host, bound, "TLS" if tls else "plaintext")
    return HttpFront(server, task, bound)
