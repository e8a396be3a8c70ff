"""Replicas found by DNS: an expert address whose host is a name (a headless Service) is every
address that name resolves to, kept in step while traffic flows.

Each name is resolved with dnspython (A and AAAA records), again after the records' TTL and at
least every ``routing.dns_refresh_s``. An address that appears becomes a replica of its own in
the pool (its own health watch, ejection and outstanding count); one that disappears leaves
rotation and closes after its open streams (:meth:`gateway.pool.Pool.remove_replica`). A name
that does not resolve by DNS at all (``localhost``, an /etc/hosts entry) is dialled as it is,
one replica that gRPC's own resolver serves; a failed refresh, or one that finds no address,
keeps the replicas it had (an expert never has none; their health tells that they are gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from expertmesh.config import MeshConfig, RoutingConfig

from .pool import Pool, replica_addresses

log = logging.getLogger(__name__)
#: Never resolve more often than this, whatever the TTL (a TTL of 0 means "do not cache").
MIN_REFRESH_S = 1.0


def split(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as host and port."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_name(address: str) -> bool:
    """True when the host of ``address`` is a DNS name to resolve, not an IP literal or localhost."""
    host, _ = split(address)
    if host in ("localhost", "") or host.endswith(".localhost"):
        return False
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return False
    return True


def join(ip: str, port: int) -> str:
    """An IP and a port as an address gRPC dials."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def resolver(routing: RoutingConfig) -> dns.asyncresolver.Resolver:
    """The system's resolver (resolv.conf: the cluster's DNS, search domains), or the configured ones."""
    if not routing.dns_nameservers:
        return dns.asyncresolver.Resolver()
    res = dns.asyncresolver.Resolver(configure=False)
    servers: list[dns.nameserver.Nameserver | str] = []
    for server in routing.dns_nameservers:
        host, port = split(server) if server.count(":") == 1 or server.startswith("[") else (server, 53)
        servers.append(dns.nameserver.Do53Nameserver(host, port))
    res.nameservers = servers
    res.lifetime = 5.0
    return res


async def resolve(res: dns.asyncresolver.Resolver, host: str) -> tuple[list[str], float] | None:
    """(the name's addresses, their TTL); None when DNS does not know the name at all."""
    found: list[str] = []
    ttls: list[float] = []
    unknown = 0
    for rdtype in ("A", "AAAA"):
        try:
            answer = await res.resolve(host, rdtype, search=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            unknown += 1
            continue
        except dns.resolver.NoAnswer:
            continue
        found += [r.address for r in answer]
        if answer.rrset is not None:
            ttls.append(float(answer.rrset.ttl))
    if unknown == 2:
        return None
    return found, min(ttls, default=0.0)


@dataclass
class _Name:
    """One expert address that is a DNS name, and the replicas it stands for now."""

    expert_id: str
    address: str
    addresses: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class Discovery:
    """Resolves every expert address that is a DNS name and keeps the pool's replicas in step."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.names: dict[tuple[str, str], _Name] = {}
        self.routing = RoutingConfig()
        self._resolver: dns.asyncresolver.Resolver | None = None
        pool.owned_elsewhere = lambda expert_id, address: (expert_id, address) in self.names

    async def apply(self, config: MeshConfig) -> None:
        """Apply a (new) config to the pool: the static addresses there, the names here.

        New names are resolved once before this returns, so that the gateway starts (or a
        reload completes) with their replicas in the pool; removed names' replicas drain.
        """
        self.routing = config.routing
        self._resolver = resolver(config.routing)
        wanted = {
            (e, a) for e, addresses in replica_addresses(config).items() for a in addresses if is_name(a)
        }
        for key in [k for k in self.names if k not in wanted]:
            name = self.names.pop(key)
            if name.task is not None:
                name.task.cancel()
            for address in name.addresses:
                self.pool.remove_replica(name.expert_id, address)
        fresh = [_Name(*k) for k in sorted(wanted) if k not in self.names]
        self.names.update({(n.expert_id, n.address): n for n in fresh})
        self.pool.apply(config)  # leaves every name above to discovery (owned_elsewhere)
        for name in fresh:
            delay = await self.refresh(name)
            name.task = asyncio.create_task(self._run(name, delay))

    async def refresh(self, name: _Name) -> float:
        """Resolve one name now and add or remove its replicas; the seconds until the next time."""
        assert self._resolver is not None
        host, port = split(name.address)
        try:
            result = await resolve(self._resolver, host)
        except dns.exception.DNSException as e:
            log.warning(
                "expert %s: resolving %s failed (%s); keeping its %d replicas",
                name.expert_id,
                host,
                e,
                len(name.addresses),
            )
            return self.routing.dns_refresh_s
        if result is None:
            found, ttl = {name.address}, self.routing.dns_refresh_s  # not in DNS: gRPC resolves it
        elif not result[0] and name.addresses:
            # every pod gone (scaled to 0, a rollout): keep the last ones, whose health says so
            log.warning("expert %s: %s has no address now; keeping its last replicas", name.expert_id, host)
            return self.routing.dns_refresh_s
        else:
            ips, ttl = result
            found = {join(ip, port) for ip in ips}
        server_name = host if result is not None else None
        for address in sorted(found - name.addresses):
            self.pool.add_replica(name.expert_id, address, server_name)
        for address in sorted(name.addresses - found):
            self.pool.remove_replica(name.expert_id, address)
        if found != name.addresses:
            log.info(
                "expert %s: %s -> %s", name.expert_id, name.address, ", ".join(sorted(found)) or "no address"
            )
        name.addresses = found
        return min(max(ttl, MIN_REFRESH_S), self.routing.dns_refresh_s)

    async def _run(self, name: _Name, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self.refresh(name)

    async def close(self) -> None:
        """Stop refreshing."""
        tasks = [n.task for n in self.names.values() if n.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
