"""Outlier ejection, after Envoy's: only a replica's own failures count against it.

``after_failures`` consecutive failures of a replica (it refused the connection, died
mid-stream, answered UNAVAILABLE or INTERNAL, or sent no first token in time) take it out of
rotation for ``base_s x 2^n``, capped at ``max_s`` (Envoy's ``max_ejection_time``); ``n`` falls by
one for every ``decay_s`` without an ejection, so a replica that failed once long ago is not
punished for it. A caller's deadline or cancel, an invalid request and a full queue are not the
replica's failures and never count. The forwarder also keeps at most
``routing.max_ejection_percent`` of an expert's replicas out at once (:func:`may_eject`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the replica holds an Ejection: a type-only import breaks the cycle
    from .replica import Replica


@dataclass
class Ejection:
    """One replica's failure streak and ejection state."""

    after_failures: int = 3
    base_s: float = 5.0
    max_s: float = 300.0
    decay_s: float = 60.0
    consecutive_failures: int = 0
    ejections: int = 0  # times ejected since the gateway started (shown by ListExperts)
    until: float = 0.0
    _exponent: int = 0
    _quiet_since: float = 0.0

    def ejected(self, now: float | None = None) -> bool:
        """True while the replica is out of rotation."""
        return (time.monotonic() if now is None else now) < self.until

    def success(self) -> None:
        """A request went through: the failure streak ends."""
        self.consecutive_failures = 0

    def _decay(self, now: float) -> None:
        if not self._exponent or now < self.until:
            return
        start = max(self.until, self._quiet_since)
        steps = int((now - start) // self.decay_s)
        if steps:
            self._exponent = max(self._exponent - steps, 0)
            self._quiet_since = start + steps * self.decay_s

    def next_ejection_s(self, now: float | None = None) -> float:
        """How long the next ejection would last."""
        self._decay(time.monotonic() if now is None else now)
        return min(self.base_s * 2**self._exponent, self.max_s)

    def failure(self, may_eject: bool, now: float | None = None) -> bool:
        """Count one of the replica's own failures; True when this one ejects it."""
        now = time.monotonic() if now is None else now
        self.consecutive_failures += 1
        if self.consecutive_failures < self.after_failures or not may_eject or self.ejected(now):
            return False
        self.until = now + self.next_ejection_s(now)
        self._quiet_since = self.until
        self._exponent += 1
        self.ejections += 1
        self.consecutive_failures = 0
        return True

    def health_passed(self) -> None:
        """A fresh passing health check brings an ejected replica back."""
        self.until = 0.0
        self.consecutive_failures = 0


def may_eject(ejected: int, total: int, max_percent: float) -> bool:
    """Whether one more of an expert's ``total`` replicas may be ejected while ``ejected`` are.

    One replica may always be ejected (a lone replica too: its fallbacks serve meanwhile, and
    panic mode tries it again when nothing else is available).
    """
    return ejected == 0 or (ejected + 1) * 100 <= total * max_percent


def may_eject_replica(
    replica: Replica, siblings: Sequence[Replica], candidates: Iterable[Replica], max_percent: float
) -> bool:
    """Whether a failure may eject ``replica``: its expert's ejected share (``siblings``, its
    replicas) stays in bounds, and another of the request's ``candidates`` is available."""
    ejected = sum(1 for other in siblings if other.ejection.ejected())
    if not may_eject(ejected, len(siblings), max_percent):
        return False
    return any(other is not replica and other.available() for other in candidates)
