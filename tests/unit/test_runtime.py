"""The server runtime both servers share: the stop order, and the entry point's refusals."""

from __future__ import annotations

import asyncio

import pytest

from expertmesh.runtime import Refused, Runtime, entry
from expertmesh.telemetry import Identity


async def test_the_runtime_stops_in_order() -> None:
    stop = asyncio.Event()
    runtime = Runtime(Identity("gateway"), None, "127.0.0.1", 4 * 1024 * 1024, stop=stop)
    order: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            order.append("background cancelled")
            raise

    async def drained() -> None:
        order.append("drained (async)")

    port = runtime.bind("127.0.0.1", 0)
    assert port > 0
    await runtime.start()
    runtime.background(forever())
    runtime.draining += [lambda: order.append("draining (sync)"), drained]
    runtime.closing.append(lambda: order.append("closed"))
    graces: list[float] = []

    def grace() -> float:
        graces.append(0.1)
        order.append("server stops")
        return 0.1

    serving = asyncio.create_task(runtime.serve(grace))
    await asyncio.sleep(0)
    assert not serving.done()
    stop.set()
    await serving
    # The background task sees its cancel when it next runs: after the draining began at latest.
    assert order.index("draining (sync)") < order.index("drained (async)") < order.index("server stops")
    assert order[-1] == "closed" and "background cancelled" in order
    assert graces == [0.1]  # read once, at stop time


@pytest.mark.parametrize("error", [Refused("no such expert"), ValueError("boom")])
def test_entry_refusals_exit_2_with_the_reason(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    def start():  # type: ignore[no-untyped-def]
        raise error

    if isinstance(error, Refused):
        assert entry(start) == 2
        assert capsys.readouterr().err == "error: no such expert\n"
    else:  # not a refusal: a bug, raised as is
        with pytest.raises(ValueError, match="boom"):
            entry(start)


def test_entry_returns_the_servers_exit_code() -> None:
    async def serve() -> int:
        return 1

    assert entry(serve) == 1
