"""Admission control: how many Generate streams the gateway serves at once, in all and per peer.

A stream over either limit is refused at once with RESOURCE_EXHAUSTED and gRPC's retry pushback
(``grpc-retry-pushback-ms``), before any routing or expert work: overload is shed at the door,
and one client cannot take every slot.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from expertmesh.errors import ResourceExhausted


def peer_host(peer: str) -> str:
    """The client's address without its port: ``ipv4:10.0.0.1:5000`` -> ``ipv4:10.0.0.1``.

    One host opens many connections (each with its own port); the limit is per host.
    """
    if peer.startswith("ipv6:[") and "]" in peer:
        return peer[: peer.index("]") + 1]
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer  # unix:, or what a test's fake context reports


class Admission:
    """Counts the streams in flight; :meth:`admit` holds a slot for the length of a stream."""

    def __init__(self, max_streams: int, max_per_peer: int) -> None:
        self.max_streams = max_streams
        self.max_per_peer = max_per_peer
        self.in_flight = 0
        self.by_peer: Counter[str] = Counter()

    @contextlib.contextmanager
    def admit(self, peer: str) -> Iterator[None]:
        """A slot for one stream from ``peer``; ResourceExhausted when there is none."""
        host = peer_host(peer)
        if self.in_flight >= self.max_streams:
            raise ResourceExhausted(
                f"the gateway is serving {self.in_flight} streams, its limit "
                f"(gateway.max_concurrent_streams); retry later"
            )
        if self.by_peer[host] >= self.max_per_peer:
            raise ResourceExhausted(
                f"this client already has {self.by_peer[host]} streams open, the limit per client "
                f"(gateway.max_streams_per_peer); retry later"
            )
        self.in_flight += 1
        self.by_peer[host] += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.by_peer[host] -= 1
            if not self.by_peer[host]:
                del self.by_peer[host]
