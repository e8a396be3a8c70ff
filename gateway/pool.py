"""Every replica of every expert, kept in step with the (hot-reloadable) mesh config."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from expertmesh.config import MeshConfig
from expertmesh.tls import link_security

from .health import Ejection, ExpertLink

log = logging.getLogger(__name__)


def replica_addresses(config: MeshConfig) -> dict[str, list[str]]:
    """expert_id -> its addresses: the configured (or default) address, then ``replicas``."""
    return {
        e.expert_id: list(dict.fromkeys([config.expert_address(i), *e.replicas]))
        for i, e in enumerate(config.experts)
    }


class Pool:
    """The links the gateway routes over; ``apply`` reconciles them with a new config."""

    def __init__(self) -> None:
        self.replicas: dict[str, list[ExpertLink]] = {}
        self.changed = asyncio.Event()
        self._retired: list[ExpertLink] = []

    def links(self) -> Iterable[ExpertLink]:
        """Every current link."""
        for links in self.replicas.values():
            yield from links

    def apply(self, config: MeshConfig) -> None:
        """Open links for new addresses, retire removed ones, update ejection settings.

        A retired link is closed only once its open streams have finished, so a reload never
        drops a stream in flight.
        """
        wanted = replica_addresses(config)
        current = {(link.expert_id, link.address): link for link in self.links()}
        routing = config.routing
        credentials, options = link_security(config)  # read once per config, shared by new links
        replicas: dict[str, list[ExpertLink]] = {}
        for expert_id, addresses in wanted.items():
            replicas[expert_id] = []
            for address in addresses:
                link = current.pop((expert_id, address), None)
                if link is None:
                    link = ExpertLink(expert_id, address, Ejection(), credentials, options)
                    link.start()
                    log.info("expert %s: replica %s added", expert_id, address)
                link.ejection.after_failures = routing.eject_after_failures
                link.ejection.base_s = routing.eject_base_s
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
