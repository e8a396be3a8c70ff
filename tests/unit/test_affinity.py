"""Prefix-aware replica choice (gateway/affinity.py): keys, rendezvous hashing, bounded loads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.gateway import affinity
from expertmesh.v1 import expertmesh_pb2 as pb

SYSTEM = "You are a careful assistant. " * 60  # ~1 700 characters: longer than the hashed prefix


@dataclass(eq=False)
class Rep:
    address: str
    outstanding: int = 0


def _replicas(n: int) -> list[Rep]:
    return [Rep(f"127.0.0.1:{5000 + i}") for i in range(n)]


def test_prefix_key_is_the_first_characters_of_the_prompt_or_the_turns() -> None:
    a = pb.GenerateRequest(prompt=SYSTEM + "What is a CPU?")
    b = pb.GenerateRequest(prompt=SYSTEM + "Tell me a story.")
    assert affinity.request_key(a, None, "prefix", 1024) == affinity.request_key(b, None, "prefix", 1024)
    assert affinity.request_key(a, None, "prefix", 4096) != affinity.request_key(b, None, "prefix", 4096)
    chat = pb.GenerateRequest(
        messages=[pb.Message(role="system", content=SYSTEM), pb.Message(role="user", content="hi")]
    )
    other = pb.GenerateRequest(messages=[pb.Message(role="user", content=SYSTEM)])
    assert affinity.request_key(chat, None, "prefix", 64) != affinity.request_key(other, None, "prefix", 64)
    assert affinity.request_key(pb.GenerateRequest(), None, "prefix", 64) is None


def test_session_key_comes_from_metadata_only() -> None:
    request = pb.GenerateRequest(prompt=SYSTEM)
    assert affinity.request_key(request, [("x-session-id", "s-1")], "session", 64) == "s-1"
    assert affinity.request_key(request, [("x-request-id", "r")], "session", 64) is None
    assert affinity.request_key(request, [("x-session-id", "s-1")], "none", 64) is None


def test_a_key_keeps_its_replica_and_keys_spread_over_all() -> None:
    reps = _replicas(4)
    homes = Counter(affinity.home(f"prefix {i}", reps).address for i in range(2000))  # type: ignore[union-attr]
    assert set(homes) == {r.address for r in reps}
    assert min(homes.values()) > 400  # ~500 each
    # Removing a replica moves only the keys it held (rendezvous hashing).
    before = {i: affinity.home(f"prefix {i}", reps) for i in range(500)}
    after = {i: affinity.home(f"prefix {i}", reps[:3]) for i in range(500)}
    assert all(after[i] is before[i] for i in range(500) if before[i] is not reps[3])


def test_prefer_puts_the_home_replica_first_within_its_bound() -> None:
    reps = _replicas(2)
    key = "shared system prompt"
    home = affinity.home(key, reps)
    other = next(r for r in reps if r is not home)
    assert affinity.prefer([other, home], reps, key, 1.25)[0] is home
    # Bounded loads: home may hold ceil(1.25 * (total + 1) / 2).
    home.outstanding = 2
    assert affinity.bound(reps, 1.25) == 2
    assert affinity.prefer([other, home], reps, key, 1.25) == [other, home]  # busy: least outstanding
    assert affinity.prefer([other, home], reps, key, 2.0)[0] is home  # a looser bound keeps it


def test_an_unavailable_home_falls_back_to_least_outstanding() -> None:
    reps = _replicas(3)
    key = "k"
    home = affinity.home(key, reps)
    available = sorted((r for r in reps if r is not home), key=lambda r: r.outstanding)
    assert affinity.prefer(available, reps, key, 1.25) == available
    assert affinity.prefer(available[:1], reps, key, 1.25) == available[:1]
    assert affinity.prefer(list(reps), reps, None, 1.25) == reps  # no key: unchanged


def test_bounded_load_spreads_a_burst_of_one_key() -> None:
    # 8 streams of one prefix arriving together on 2 replicas: home takes what its bound allows,
    # the rest go least outstanding; nobody waits behind a busy replica.
    reps = _replicas(2)
    for _ in range(8):
        order = affinity.prefer(sorted(reps, key=lambda r: r.outstanding), reps, "one prefix", 1.25)
        order[0].outstanding += 1
    home = affinity.home("one prefix", reps)
    assert home is not None and home.outstanding == 5 and sum(r.outstanding for r in reps) == 8


def test_order_follows_the_routing_config() -> None:
    reps = _replicas(2)
    request = pb.GenerateRequest(prompt=SYSTEM + "a question")
    key = affinity.request_key(request, None, "prefix", 1024)
    assert key is not None
    home = affinity.home(key, reps)
    other = next(r for r in reps if r is not home)
    expert = ExpertConfig(expert_id="e", model_path="m", domain="general")
    on = affinity.replica_order(request, None, RoutingConfig(affinity="prefix"), lambda _: reps)
    off = affinity.replica_order(request, None, RoutingConfig(), lambda _: reps)
    other.outstanding, home.outstanding = 0, 1  # within the bound: the key's replica still first
    assert on(expert, [other, home])[0] is home
    assert off(expert, [home, other])[0] is other  # no affinity: least outstanding
