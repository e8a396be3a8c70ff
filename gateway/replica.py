"""One replica's state as the gateway sees it, kept in one place: what its health watch last
reported (can it take a request? is its engine loaded?), its open streams and its ejection.

No I/O here: the link (:mod:`.link`) owns the channel, the watch (:mod:`.watch`) feeds the
reports in, and the route plan (:mod:`.plan`) reads them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from expertmesh.v1 import expertmesh_pb2 as pb

from .ejection import Ejection

log = logging.getLogger(__name__)


#: The health of a replica added by a config reload until its first report: not routed to.
STARTING = "STARTING"


class Replica:
    """One replica address of one expert, and what is known of it."""

    def __init__(self, expert_id: str, address: str, ejection: Ejection | None = None) -> None:
        self.expert_id = expert_id
        self.address = address
        self.health = "UNKNOWN"
        self.engine_ready = False  # what the expert reported (its engine service), not its config
        self.outstanding = 0
        self.ejection = ejection or Ejection()
        self.changed = asyncio.Event()

    @property
    def serving(self) -> bool:
        """True while the replica's last health report was SERVING."""
        return self.health == "SERVING"

    @property
    def cold(self) -> bool:
        """Its engine is not loaded, as the expert itself reports it: a request waits for the
        load (a lazy expert, or an eager one that was unloaded since). Until the first report,
        the gateway does not take a loaded engine for granted."""
        return not self.engine_ready

    def available(self) -> bool:
        """Serving (or not yet known) and not ejected."""
        return self.health in ("SERVING", "UNKNOWN") and not self.ejection.ejected()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def set_health(self, status: str) -> None:
        """Record a health report (a ``ServingStatus`` name); a passing one ends an ejection."""
        if status != self.health:
            log.info("expert %s at %s: %s -> %s", self.expert_id, self.address, self.health, status)
            if status == "SERVING" and self.ejection.ejected():
                self.ejection.health_passed()
            self.health = status
            self._notify()

    def set_engine(self, ready: bool) -> None:
        """Record an engine report (SERVING only while the expert's engine is loaded)."""
        if ready != self.engine_ready:
            self.engine_ready = ready
            self._notify()

    def status(self) -> pb.ReplicaStatus:
        """This replica for ListExperts."""
        left = max(self.ejection.until - time.monotonic(), 0.0)
        return pb.ReplicaStatus(
            address=self.address,
            health=self.health,
            engine_ready=self.engine_ready,
            outstanding=self.outstanding,
            consecutive_failures=self.ejection.consecutive_failures,
            ejections=self.ejection.ejections,
            ejected_for_s=round(left, 3),
        )

    def row(self) -> tuple[str, str, str, bool]:
        """(expert id, address, health, ejected) for the replica metrics."""
        return self.expert_id, self.address, self.health, self.ejection.ejected()
