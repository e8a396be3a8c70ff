"""`expertmesh up` reloading its config (SIGHUP): an expert added is started and routed to once
SERVING, an expert removed is stopped (its process gone) and its domain routes per the config,
while streams to the expert that stays run on uninterrupted.

Real processes: `up`, the gateway, one expert on a tiny engine, and for a while a second one
(two engines at most).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from expertmesh import procs
from expertmesh.client import MeshClient
from expertmesh.config import load_config

from ..expert_support import stop_group
from ..support import EXPERTMESH, Up, demo_expert, health_status, write_config

pytestmark = pytest.mark.engine
STREAM_TOKENS = 48


def write_atomically(path: Path, experts: list[dict[str, Any]], **mesh: Any) -> None:
    """Replace the config in one rename: the gateway also re-reads the file when it changes and
    must never see it half written."""
    staged = write_config(path.with_suffix(".next"), experts, **mesh)
    os.replace(staged, path)


class Streams:
    """Streams to domain general, one after another, until stopped; every one must end whole."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.started = 0
        self.finished: list[int] = []  # the numbers of the streams that ended with a finish_reason
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with MeshClient(self.gateway, timeout=300) as mesh:
            while not self.stop.is_set():
                self.started += 1
                number, last, experts = self.started, None, set()
                async for msg in mesh.stream("Once upon a time", domain="general", max_tokens=STREAM_TOKENS):
                    experts.add(msg.expert_id)
                    last = msg
                assert last is not None and last.finish_reason in ("length", "stop"), last
                assert experts == {"general"}, experts
                self.finished.append(number)


@pytest.fixture
def up(tmp_path: Path, demo_models: list[Path]) -> Iterator[Up]:
    path = write_config(tmp_path / "mesh.yaml", [demo_expert("general", "general")], default_domain="general")
    output = tmp_path / "up.out"
    with output.open("wb") as out:
        proc = procs.spawn(
            [EXPERTMESH, "up", "--config", str(path), "--log-dir", str(tmp_path / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Up(proc, load_config(path), output)
    yield running
    stop_group(running.proc, timeout=60)


async def answer(gateway: str, prompt: str, **kwargs: Any) -> str:
    """The expert that answered ``prompt``."""
    async with MeshClient(gateway, timeout=120) as mesh:
        return (await mesh.complete(prompt, max_tokens=4, **kwargs)).expert_id


def group_alive(pgid: int) -> str:
    """The processes of group ``pgid`` still alive (zombies are dead already), as text."""
    left = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
    return "; ".join(left)


async def routed(gateway: str, domain: str) -> str:
    """The expert that answered a request for ``domain``, or the NOT_FOUND error's details."""
    try:
        return await answer(gateway, "def f():", domain=domain)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return e.details() or ""


async def until(
    check: Callable[[], Awaitable[str]], wanted: Callable[[str], bool], timeout: float = 120
) -> str:
    """``await check()`` until its result is ``wanted`` (each try is an RPC; no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    result = ""
    while time.monotonic() < deadline:
        if wanted(result := await check()):
            return result
        await asyncio.sleep(0.2)
    raise AssertionError(f"not as wanted after {timeout} s; last: {result!r}")


async def test_reload_starts_an_added_expert_and_stops_a_removed_one(up: Up, tmp_path: Path) -> None:
    path, gateway = tmp_path / "mesh.yaml", f"127.0.0.1:{up.config.gateway.port}"
    await up.wait_for_line("mesh ready", timeout=300)
    general = demo_expert("general", "general", port=up.config.experts[0].port)
    streams = Streams(gateway)
    streaming = asyncio.create_task(streams.run())
    try:
        while not streams.started:
            await asyncio.sleep(0.05)

        # Add an expert with its own domain; until it serves, its domain falls back to general.
        code = demo_expert("code", "code", "demo-code")
        fallbacks = {"routing": {"fallbacks": {"code": ["general"]}}}
        write_atomically(path, [general, code], default_domain="general", **fallbacks)
        in_flight_at_add = streams.started
        up.proc.send_signal(signal.SIGHUP)
        started = await up.wait_for_line("code: started (pid ")
        pid = int(re.search(r"pid (\d+)", started).group(1))  # type: ignore[union-attr]
        code_at = f"127.0.0.1:{code['port']}"
        loading = await health_status(code_at) != "SERVING"  # always, on a small host
        # once the gateway has read the new config (the domain is known), before code serves
        served_by = await until(lambda: routed(gateway, "code"), lambda r: not r.startswith("no expert"))
        if loading:
            assert served_by == "general"
        await up.wait_for_line("code: SERVING at", timeout=300)
        await until(lambda: routed(gateway, "code"), lambda r: r == "code")  # the gateway saw it too
        assert "general: stopped" not in up.text()  # the expert that stays was left running

        # Remove it again: stopped, its process gone, its domain unknown to the gateway.
        write_atomically(path, [general], default_domain="general")
        in_flight_at_remove = streams.started
        up.proc.send_signal(signal.SIGHUP)
        await up.wait_for_line("code: stopped (exit code", timeout=60)
        assert not psutil.pid_exists(pid)
        # nor any of its engine processes (its process group): killed with it, gone once they exit
        await until(lambda: asyncio.to_thread(group_alive, pid), lambda left: left == "", timeout=60)
        details = await until(lambda: routed(gateway, "code"), lambda r: r.startswith("no expert"))
        assert details == "no expert serves domain 'code' (domains: general)", details
        assert await answer(gateway, "def f():") == "general"  # classified: the default domain
    finally:
        streams.stop.set()
        await streaming  # the stream running now ends first; a cut one raises here
    # Every stream ended whole, the ones in flight at each reload among them.
    assert streams.finished == list(range(1, streams.started + 1))
    assert in_flight_at_add < in_flight_at_remove < streams.started
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.text()
    out = up.text()
    for step in (
        "config reload: experts added ['code']",
        "config reload: the gateway re-reads the config (SIGHUP)",
        "code: removed; stopping it",
    ):
        assert step in out, out
