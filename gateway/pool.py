"""Every replica of every expert, kept in step with the (hot-reloadable) mesh config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import grpc

from expertmesh.config import LimitsConfig, MeshConfig, RoutingConfig
from expertmesh.tls import TlsError, link_files, link_security

from .ejection import Ejection
from .link import ExpertLink
from .replica import STARTING

log = logging.getLogger(__name__)


def replica_addresses(config: MeshConfig) -> dict[str, list[str]]:
    """expert_id -> its addresses: its local replicas' (the configured address first), then
    ``replicas`` run elsewhere."""
    return {
        e.expert_id: list(dict.fromkeys([*config.local_addresses(i), *e.replicas]))
        for i, e in enumerate(config.experts)
    }


class Pool:
    """The links the gateway routes over; ``apply`` reconciles them with a new config."""

    def __init__(self) -> None:
        self.replicas: dict[str, list[ExpertLink]] = {}
        self.changed = asyncio.Event()
        self._retired: list[ExpertLink] = []
        self._security: tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]] | None = None
        self._stamp: tuple[float, ...] | None = None
        self.renewals = 0
        self._limits: LimitsConfig = LimitsConfig()
        self._routing: RoutingConfig = RoutingConfig()
        #: (expert_id, configured address) -> True when its replicas come from add_replica
        #: (gateway.discovery resolves it) rather than from the address itself.
        self.owned_elsewhere: Callable[[str, str], bool] = lambda expert_id, address: False
        self._added: set[tuple[str, str]] = set()

    def _link_security(self, config: MeshConfig) -> bool:
        """Read the gateway's link certificates if they changed; True when links must be renewed.

        On a broken file the links keep the certificates in use (and the log says why); at start,
        with none in use yet, the error stops the gateway.
        """
        stamp = link_files(config)
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a broken file is reported once, not every second
        try:
            security = link_security(config)
        except TlsError as e:
            if self._security is None:
                raise
            log.error("link certificate reload rejected, keeping the certificates in use: %s", e)
            return False
        renew = self._security is not None
        self._security = security
        return renew

    def refresh_security(self, config: MeshConfig) -> None:
        """Renew every link when the gateway's certificate files changed (and are valid).

        New links carry new requests at once; the old ones close after their last stream.
        """
        if link_files(config) != self._stamp:
            self.apply(config)

    def of(self, expert_id: str) -> list[ExpertLink]:
        """The replicas of ``expert_id`` (none for an unknown expert)."""
        return self.replicas.get(expert_id, [])

    def links(self) -> Iterable[ExpertLink]:
        """Every current link."""
        for links in self.replicas.values():
            yield from links

    def apply(self, config: MeshConfig) -> None:
        """Open links for new addresses, retire removed ones, update ejection settings.

        A retired link is closed only once its open streams have finished, so a reload never
        drops a stream in flight.
        """
        renew = self._link_security(config)
        self._limits, self._routing = config.limits, config.routing
        wanted = {
            expert_id: [a for a in addresses if not self.owned_elsewhere(expert_id, a)]
            for expert_id, addresses in replica_addresses(config).items()
        }
        previous = {(link.expert_id, link.address): link for link in self.links()}
        reloading = bool(previous)
        # replicas add_replica gave an expert stay (a renewal reopens them with the new certificates)
        added = {key: link.server_name for key, link in previous.items() if key in self._added}
        current = {} if renew else dict(previous)
        if renew:
            self.renewals += 1
            log.info("link certificates changed: renewing the links to every expert")
            self._retired.extend(self.links())
        routing = config.routing
        replicas: dict[str, list[ExpertLink]] = {}
        for expert_id, addresses in wanted.items():
            replicas[expert_id] = []
            names = {a: None for a in addresses} | {a: n for (e, a), n in added.items() if e == expert_id}
            for address, server_name in names.items():
                link = current.pop((expert_id, address), None)
                if link is None:
                    link = self._open(expert_id, address, server_name)
                    was = previous.get((expert_id, address))
                    if (reloading and was is None) or (was is not None and was.health == STARTING):
                        # added by a reload: often a process `up` is only starting, routed to
                        # once its health watch reports SERVING (not while unknown, as at start);
                        # a renewal keeps the hold-out of one still STARTING
                        link.health = STARTING
                _configure(link, routing)
                replicas[expert_id].append(link)
        for link in current.values():
            log.info("expert %s: replica %s removed (closing after %d open streams)", *_who(link))
            self._added.discard((link.expert_id, link.address))
            self._retired.append(link)
        self._added = {key for key in self._added if key[0] in wanted}
        self.replicas = replicas
        self._notify()

    def _open(self, expert_id: str, address: str, server_name: str | None) -> ExpertLink:
        assert self._security is not None
        credentials, options = self._security
        if server_name and credentials is not None and not any(k == _NAME_OVERRIDE for k, _ in options):
            # dialled by IP: the certificate names the DNS name the address came from
            options = [*options, (_NAME_OVERRIDE, server_name)]
        link = ExpertLink(expert_id, address, Ejection(), self._limits, credentials, options)
        link.server_name = server_name
        link.start()
        log.info("expert %s: replica %s added", expert_id, address)
        return link

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def add_replica(self, expert_id: str, address: str, server_name: str | None = None) -> None:
        """One more replica of an expert of the current config (watched, balanced, ejected on its own).

        ``server_name``: the name its certificate carries when ``address`` is an IP found for it.
        """
        links = self.replicas.get(expert_id)
        if links is None or any(link.address == address for link in links):
            return
        link = self._open(expert_id, address, server_name)
        _configure(link, self._routing)
        self._added.add((expert_id, address))
        # a new list: a request that already holds the old one keeps a consistent view
        self.replicas = {**self.replicas, expert_id: [*links, link]}
        self._notify()

    def remove_replica(self, expert_id: str, address: str) -> None:
        """Take a replica out of rotation; it closes once its open streams have finished."""
        links = self.replicas.get(expert_id, [])
        gone = [link for link in links if link.address == address]
        if not gone:
            return
        self._added.discard((expert_id, address))
        self.replicas = {**self.replicas, expert_id: [link for link in links if link.address != address]}
        for link in gone:
            log.info("expert %s: replica %s removed (closing after %d open streams)", *_who(link))
            self._retired.append(link)
        self._notify()

    async def reap(self) -> None:
        """Close retired links that no longer carry a stream."""
        for link in [r for r in self._retired if r.outstanding == 0]:
            self._retired.remove(link)
            await link.close()

    async def close(self) -> None:
        """Close every link."""
        for link in [*self.links(), *self._retired]:
            await link.close()


_NAME_OVERRIDE = "grpc.ssl_target_name_override"


def _configure(link: ExpertLink, routing: RoutingConfig) -> None:
    link.ejection.after_failures = routing.eject_after_failures
    link.ejection.base_s = routing.eject_base_s
    link.ejection.max_s = routing.eject_max_s
    link.ejection.decay_s = routing.eject_decay_s


def _who(link: ExpertLink) -> tuple[str, str, int]:
    return link.expert_id, link.address, link.outstanding
