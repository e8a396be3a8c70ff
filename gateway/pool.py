"""Every replica of every expert, kept in step with the (hot-reloadable) mesh config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc

from expertmesh.config import MeshConfig
from expertmesh.tls import TlsError, link_files, link_security

from .ejection import Ejection
from .health import ExpertLink

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
        assert self._security is not None
        credentials, options = self._security
        wanted = replica_addresses(config)
        current = {} if renew else {(link.expert_id, link.address): link for link in self.links()}
        if renew:
            self.renewals += 1
            log.info("link certificates changed: renewing the links to every expert")
            self._retired.extend(self.links())
        routing = config.routing
        replicas: dict[str, list[ExpertLink]] = {}
        for expert_id, addresses in wanted.items():
            replicas[expert_id] = []
            for address in addresses:
                link = current.pop((expert_id, address), None)
                if link is None:
                    link = ExpertLink(expert_id, address, Ejection(), config.limits, credentials, options)
                    link.start()
                    log.info("expert %s: replica %s added", expert_id, address)
                link.ejection.after_failures = routing.eject_after_failures
                link.ejection.base_s = routing.eject_base_s
                link.ejection.max_s = routing.eject_max_s
                link.ejection.decay_s = routing.eject_decay_s
                replicas[expert_id].append(link)
        for link in current.values():
            log.info("expert %s: replica %s removed (closing after %d open streams)", *_who(link))
            self._retired.append(link)
        self.replicas = replicas
        self.changed.set()
        self.changed = asyncio.Event()

    async def reap(self) -> None:
        """Close retired links that no longer carry a stream."""
        for link in [r for r in self._retired if r.outstanding == 0]:
            self._retired.remove(link)
            await link.close()

    async def close(self) -> None:
        """Close every link."""
        for link in [*self.links(), *self._retired]:
            await link.close()


def _who(link: ExpertLink) -> tuple[str, str, int]:
    return link.expert_id, link.address, link.outstanding
