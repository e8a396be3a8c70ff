"""Replicas found by DNS (gateway/discovery.py), against a real DNS server on loopback.

Without engines: the pool follows the records (added, removed, kept over a reload, a name DNS
does not know dialled as it is). With engines: one expert scaled 1 -> 2 -> 1 by its DNS records
while 8 streams run through a real gateway: no stream is lost, the new replica takes traffic,
the removed one drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.gateway.discovery import Discovery, is_name
from expertmesh.gateway.pool import Pool
from expertmesh.v1 import expertmesh_pb2 as pb

from ..dns_server import LoopbackDns
from ..expert_support import start_expert, start_gateway, stop_group
from ..support import demo_expert, free_port, wait_serving, write_config

NAME = "coder.mesh.test"


async def until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Wait until ``check()`` holds (each look is cheap; no fixed sleep stands for the event)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what or "condition not reached")
        await asyncio.sleep(0.05)


def _mesh(dns: LoopbackDns, port: int, **routing: Any) -> MeshConfig:
    return MeshConfig.model_validate(
        {
            "routing": {"dns_nameservers": [dns.address], "dns_refresh_s": 30, **routing},
            "experts": [
                {"expert_id": "coder", "domain": "code", "model_path": "/m", "address": f"{NAME}:{port}"},
                {"expert_id": "static", "domain": "general", "model_path": "/m", "port": free_port()},
            ],
        }
    )


def _addresses(pool: Pool, expert_id: str = "coder") -> list[str]:
    return sorted(link.address for link in pool.replicas.get(expert_id, []))


def test_which_addresses_are_names() -> None:
    assert is_name("coder.expertmesh.svc.cluster.local:50051") and is_name("expert-code:50052")
    assert not is_name("127.0.0.1:50051") and not is_name("[::1]:50051") and not is_name("localhost:1")


async def test_the_pool_follows_the_records() -> None:
    with LoopbackDns(ttl=1) as dns:
        dns.records.set(NAME, ["127.0.0.2"])
        pool = Pool()
        discovery = Discovery(pool)
        config = _mesh(dns, 7001)
        try:
            await discovery.apply(config)
            # resolved before apply returns: the gateway starts with the replica in its pool
            assert _addresses(pool) == ["127.0.0.2:7001"]
            assert _addresses(pool, "static") == [config.expert_address(1)]
            first = pool.replicas["coder"][0]
            dns.records.set(NAME, ["127.0.0.2", "127.0.0.3"])
            # re-resolved after the records' TTL (1 s), not only every dns_refresh_s (30 s)
            await until(lambda: len(pool.replicas["coder"]) == 2, 10, "second replica not added")
            assert _addresses(pool) == ["127.0.0.2:7001", "127.0.0.3:7001"]
            assert pool.replicas["coder"][0] is first  # the kept replica keeps its link and counts
            # a reload of the same config keeps what discovery found, without a second link to the name
            pool.apply(config)
            await discovery.apply(config)
            assert _addresses(pool) == ["127.0.0.2:7001", "127.0.0.3:7001"]
            first.outstanding = 1  # a stream still open on the replica about to go
            dns.records.set(NAME, ["127.0.0.3"])
            await until(lambda: _addresses(pool) == ["127.0.0.3:7001"], 10, "replica not removed")
            await pool.reap()
            assert first in pool._retired  # draining: not closed while its stream runs
            first.outstanding = 0
            await pool.reap()
            assert first not in pool._retired
            # no address at all (every pod gone): the last replica stays, its health tells
            dns.records.set(NAME, [])
            queries = dns.records.queries
            await until(lambda: dns.records.queries > queries + 1, 10, "not re-resolved")
            assert _addresses(pool) == ["127.0.0.3:7001"]
            # a name removed from the config: its replicas go
            without = config.model_copy(update={"experts": config.experts[1:]})
            await discovery.apply(without)
            assert "coder" not in pool.replicas and not discovery.names
        finally:
            await discovery.close()
            await pool.close()


async def test_a_name_dns_does_not_know_is_dialled_as_it_is() -> None:
    with LoopbackDns() as dns:
        pool = Pool()
        discovery = Discovery(pool)
        try:
            await discovery.apply(_mesh(dns, 7002))  # NAME has no record: NXDOMAIN
            assert _addresses(pool) == [f"{NAME}:7002"]
        finally:
            await discovery.close()
            await pool.close()


# ---- with engines -------------------------------------------------------------------------

STREAMS = 8
MAX_TOKENS = 160


def _served(replica: dict[str, Any]) -> float:
    """Generate streams an expert process finished (its own /metrics, on its host)."""
    with urllib.request.urlopen(f"http://{replica['host']}:{replica['metrics']}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "expertmesh_requests_total" and s.labels.get("role") == "expert"
    )


@pytest.fixture(scope="module")
def scaled(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[dict[str, Any]]:
    """Two processes of one expert on 127.0.0.2 and 127.0.0.3 (one port), a DNS server, a gateway."""
    tmp = tmp_path_factory.mktemp("dns")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    replicas = {}
    with LoopbackDns(ttl=1) as dns, contextlib.ExitStack() as stack:
        for host in ("127.0.0.2", "127.0.0.3"):
            metrics = free_port()
            path = write_config(
                tmp / f"expert-{host}.yaml",
                [demo_expert("coder", "code", port=port, host=host, metrics_port=metrics)],
            )
            procs.append(start_expert(path, "coder", tmp / f"logs-{host}"))
            replicas[host] = {"host": host, "address": f"{host}:{port}", "metrics": metrics}
        gateway_path = write_config(
            tmp / "gateway.yaml",
            [demo_expert("coder", "code", port=port, address=f"{NAME}:{port}")],
            routing={"dns_nameservers": [dns.address], "dns_refresh_s": 30},
        )
        dns.records.set(NAME, ["127.0.0.2"])
        gateway_port = load_config(gateway_path).gateway.port
        procs.append(start_gateway(gateway_path, tmp / "gateway.log"))
        stack.callback(lambda: [stop_group(p) for p in procs])
        yield {"dns": dns, "replicas": replicas, "gateway": f"127.0.0.1:{gateway_port}", "port": port}


async def _replicas(gateway: str) -> list[pb.ReplicaStatus]:
    async with MeshClient(gateway, timeout=10) as client:
        (coder,) = (await client.list_experts()).experts
    return list(coder.replicas)


@pytest.mark.engine
async def test_scaling_an_expert_by_dns_while_streams_run(scaled: dict[str, Any]) -> None:
    dns, replicas, gateway = scaled["dns"], scaled["replicas"], scaled["gateway"]
    a, b = replicas["127.0.0.2"], replicas["127.0.0.3"]
    for replica in (a, b):
        await wait_serving(replica["address"])
    await wait_serving(gateway)
    assert [r.address for r in await _replicas(gateway)] == [a["address"]]

    stop = asyncio.Event()
    finished: list[tuple[int, str]] = []
    failures: list[BaseException] = []

    async def worker(n: int) -> None:
        async with MeshClient(gateway, timeout=120) as client:
            while not stop.is_set():
                try:
                    done = await client.complete(f"stream {n}", max_tokens=MAX_TOKENS, ignore_eos=True)
                except grpc.aio.AioRpcError as e:  # a lost stream: recorded, the test fails below
                    failures.append(e)
                    continue
                finished.append((done.completion_tokens, done.finish_reason))

    async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    workers = [asyncio.create_task(worker(n)) for n in range(STREAMS)]
    try:
        await until(lambda: len(finished) >= STREAMS, 120, "no streams finished on one replica")
        b_before = await asyncio.to_thread(_served, b)
        # 1 -> 2: the new replica is found by its record and takes traffic
        dns.records.set(NAME, ["127.0.0.2", "127.0.0.3"])

        async def two() -> bool:
            return sorted(r.address for r in await _replicas(gateway)) == sorted([a["address"], b["address"]])

        await wait_for(two, "the second replica did not appear in ListExperts")
        listed = await _replicas(gateway)
        assert all(r.health == "SERVING" for r in listed)  # each with its own health watch

        async def b_serves() -> bool:
            return await asyncio.to_thread(_served, b) > b_before

        await wait_for(b_serves, "the new replica took no traffic")
        # 2 -> 1: the first replica's record goes while streams run on it; they finish there
        in_flight_on_a = next(r.outstanding for r in await _replicas(gateway) if r.address == a["address"])
        assert in_flight_on_a > 0  # so that draining is what is tested
        dns.records.set(NAME, ["127.0.0.3"])

        async def one() -> bool:
            return [r.address for r in await _replicas(gateway)] == [b["address"]]

        await wait_for(one, "the removed replica is still listed")
        at_removal = await asyncio.to_thread(_served, a)
        mark = len(finished)
        await until(lambda: len(finished) >= mark + 2 * STREAMS, 120, "streams stalled after 2 -> 1")
        drained = await asyncio.to_thread(_served, a)
        assert drained - at_removal <= STREAMS  # only what was already open on it finished there
        mark = len(finished)
        await until(lambda: len(finished) >= mark + 2 * STREAMS, 120, "streams stalled after 2 -> 1")
        assert await asyncio.to_thread(_served, a) == drained  # and nothing new went to it
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert not failures, failures[:3]
    assert finished and all(f == (MAX_TOKENS, "length") for f in finished)
