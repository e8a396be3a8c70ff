"""Prefix-aware replica choice: requests that share a long prefix go to one replica of an expert.

vLLM caches the KV blocks of the prompts it has seen (automatic prefix caching), per engine: a
request whose prefix (a system prompt, a conversation's earlier turns) one replica has cached
skips that part of its prefill there, and nowhere else. ``routing.affinity`` picks the key:

- ``prefix``: a hash of the prompt's first ``routing.affinity_prefix_chars`` characters (for
  chat messages, the turns in order), i.e. of its first KV blocks;
- ``session``: the caller's ``x-session-id`` metadata (none: no preference);
- ``none``: no preference, least outstanding requests first.

The key is mapped to a replica by rendezvous hashing (highest random weight: every key ranks
every replica by a hash of both; adding or removing a replica moves only the keys it ranks
first) with bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with
Bounded Loads", 2018): a replica takes a request only while its outstanding requests stay
within ``ceil(routing.affinity_balance * (total + 1) / replicas)``. When the key's replica is
over that bound, or not available (ejected, not SERVING), the order stays least outstanding
first: affinity never queues a request behind a busy replica, and never on one that is down.

Pure policy, plugged into the route plan as its replica order (:func:`replica_order`, ``plan.ReplicaOrder``)
for both ``Route`` and ``Generate``; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol, TypeVar

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.v1 import expertmesh_pb2 as pb

Mode = Literal["prefix", "session", "none"]
#: The caller's metadata key that names a session (``routing.affinity: session``).
SESSION_KEY = "x-session-id"


class Replica(Protocol):
    """What the policy reads of a replica (``gateway.replica.Replica`` has both)."""

    @property
    def address(self) -> str:
        """host:port: the replica's identity on the hash ring."""

    @property
    def outstanding(self) -> int:
        """Requests it serves now."""


R = TypeVar("R", bound=Replica)


def request_key(
    request: pb.GenerateRequest, metadata: Iterable[tuple[str, str]] | None, mode: Mode, prefix_chars: int
) -> str | None:
    """The request's affinity key under ``mode``; None: no preference."""
    if mode == "session":
        return next((str(v) for k, v in metadata or () if k == SESSION_KEY and v), None)
    if mode == "prefix":
        # Unit and record separators keep "ab"+"c" and "a"+"bc" apart.
        text = request.prompt or "\x1e".join(f"{m.role}\x1f{m.content}" for m in request.messages)
        return text[:prefix_chars] if text else None
    return None


def _weight(key: str, address: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def home(key: str, replicas: Iterable[R]) -> R | None:
    """The replica ``key`` belongs to: the highest rendezvous weight (None: no replicas)."""
    return max(replicas, key=lambda r: _weight(key, r.address), default=None)


def bound(available: Sequence[Replica], balance: float) -> int:
    """The most outstanding requests a replica may hold to take one more for its keys."""
    total = sum(r.outstanding for r in available)
    return math.ceil(balance * (total + 1) / max(len(available), 1))


def prefer(available: list[R], every: Sequence[R], key: str | None, balance: float) -> list[R]:
    """``available`` (least outstanding first) with the key's replica first where it may take it.

    ``every``: all replicas of the expert, ejected ones too, so that a key keeps its replica
    across another's ejection and falls back (least outstanding) only while its own is out.
    """
    if key is None or len(available) < 2:
        return available
    chosen = home(key, every)
    if chosen is None or chosen not in available or chosen.outstanding + 1 > bound(available, balance):
        return available
    return [chosen, *(r for r in available if r is not chosen)]


def replica_order(
    request: pb.GenerateRequest,
    metadata: Iterable[tuple[str, str]] | None,
    routing: RoutingConfig,
    replicas_of: Callable[[str], Sequence[R]],
) -> Callable[[ExpertConfig, Sequence[R]], list[R]]:
    """The route plan's replica order for ``request`` (``plan.ReplicaOrder``) under ``routing``'s
    affinity settings: least outstanding first, the key's replica first where it may take it."""
    key = request_key(request, metadata, routing.affinity, routing.affinity_prefix_chars)

    def order(expert: ExpertConfig, available: Sequence[R]) -> list[R]:
        by_load = sorted(available, key=lambda r: r.outstanding)
        return prefer(by_load, replicas_of(expert.expert_id), key, routing.affinity_balance)

    return order
