"""Bearer-token authentication at the gateway: the tokens file, its hot reload, the interceptor.

The tokens file holds one ``TOKEN [TENANT]`` per line (``#`` starts a comment); a token without
a tenant belongs to the tenant ``default``, and every other tenant must be declared in
``auth.tenants``. Every call but ``grpc.health.v1`` (open for probes) and reflection must carry
``authorization: Bearer <token>``; the token is compared with each known one in constant time
(``hmac.compare_digest``, no early exit), and a missing or unknown token ends the call with
UNAUTHENTICATED before any handler runs. Messages never repeat a token.

The check runs in one place, this interceptor, inside the handler's task (:mod:`expertmesh.guard`),
so the tenant it finds is a context variable the servicer reads. An authenticated caller is
trusted with what the gateway knows (expert addresses in ListExperts, route explanations and
failover errors); an unauthenticated one gets health (and the public schema) and nothing else.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import grpc

from expertmesh.guard import guard

log = logging.getLogger(__name__)
DEFAULT_TENANT = "default"
#: The open methods: probes must not need a secret, and reflection shows only the schema, which
#: is public (``gateway.reflection: false`` turns it off).
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: How often the tokens file's modification time is looked at.
WATCH_S = 1.0
_TOKEN = re.compile(r"^[\x21-\x7e]{16,}$")  # printable, no spaces; short tokens are guessable

#: The tenant of the call being served (set by :class:`TokenAuth`); None while auth is off.
current_tenant: ContextVar[str | None] = ContextVar("expertmesh_tenant", default=None)


class TokensError(Exception):
    """The tokens file cannot be used; the message names the file and line, never a token."""


@dataclass(frozen=True)
class Tokens:
    """The known tokens and their tenants."""

    entries: tuple[tuple[bytes, str], ...]

    def tenant_of(self, token: str) -> str | None:
        """The token's tenant, or None. Constant time in the token: every entry is compared."""
        given = token.encode()
        found: str | None = None
        for known, tenant in self.entries:
            if hmac.compare_digest(known, given) and found is None:
                found = tenant
        return found


def parse_tokens(text: str, source: str, tenants: set[str] | None = None) -> Tokens:
    """Parse a tokens file; ``tenants`` (when given) are the names a line may use."""
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) > 2:
            raise TokensError(f"{source} line {number}: expected 'TOKEN [TENANT]', got {len(fields)} fields")
        token, tenant = fields[0], fields[1] if len(fields) == 2 else DEFAULT_TENANT
        if not _TOKEN.match(token):
            raise TokensError(f"{source} line {number}: a token must be 16 or more printable characters")
        if tenants is not None and tenant != DEFAULT_TENANT and tenant not in tenants:
            known = ", ".join(sorted(tenants)) or "none"
            raise TokensError(f"{source} line {number}: tenant {tenant!r} is not in auth.tenants ({known})")
        if token.encode() in seen:
            raise TokensError(f"{source} line {number}: this token is already on an earlier line")
        seen.add(token.encode())
        entries.append((token.encode(), tenant))
    if not entries:
        raise TokensError(f"{source}: no tokens (every caller would be refused)")
    return Tokens(tuple(entries))


class TokensFile:
    """The tokens file, re-read when it changes; an invalid file keeps the tokens in use."""

    def __init__(self, path: str | Path, tenants: set[str] | None = None) -> None:
        self.path = Path(path)
        self.tenants = tenants
        self._mtime = self._stat()
        self.tokens = self._read()  # raises TokensError: the gateway does not start without tokens
        self.reloads = 0

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _read(self) -> Tokens:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as e:
            raise TokensError(f"cannot read tokens file {self.path}: {e.strerror or e}") from None
        return parse_tokens(text, str(self.path), self.tenants)

    def refresh(self) -> bool:
        """Re-read the file if its modification time changed; True when new tokens are in use."""
        mtime = self._stat()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.tokens = self._read()
        except TokensError as e:
            log.error("tokens reload rejected, keeping the tokens in use: %s", e)
            return False
        self.reloads += 1
        log.info("tokens reloaded from %s: %d tokens", self.path, len(self.tokens.entries))
        return True

    async def watch(self) -> None:
        """Refresh every :data:`WATCH_S` seconds until cancelled."""
        while True:
            await asyncio.sleep(WATCH_S)
            self.refresh()


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class TokenAuth(grpc.aio.ServerInterceptor):
    """Every call but health needs a known bearer token; the caller's tenant is set for the handler."""

    def __init__(self, tokens: TokensFile) -> None:
        self.tokens = tokens

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        token = bearer_token(context.invocation_metadata())  # type: ignore[arg-type]
        if token is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this gateway needs 'authorization: Bearer <token>' metadata",
            )
        tenant = self.tokens.tokens.tenant_of(token or "")
        if tenant is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        current_tenant.set(tenant)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        return guard(handler, self._check)
