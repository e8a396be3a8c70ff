"""The load generator and its statistics, shared by every scenario (and by the in-process runner).

A scenario supplies one coroutine per request, ``one(index, recorder)``, that streams request
``index`` and calls ``recorder.tokens(n)`` for every streamed message carrying ``n`` new output
tokens. :func:`run_load` keeps exactly ``concurrency`` of them in flight until ``requests`` are
done (a closed loop), and :class:`LoadResult` turns the records into the reported numbers.

Inter-token latency counts per token: a message that carries ``k`` tokens ``dt`` after the
previous one contributes ``k`` gaps of ``dt / k``, so that a server that coalesces ready tokens
is compared fairly with one that sends each token on its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field


class BenchError(Exception):
    """A scenario could not be measured; the message says which and why."""


class Recorder:
    """The timeline of one request: time to first token, per-token gaps, the token count."""

    __slots__ = ("count", "first", "gaps", "last", "start")

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first = 0.0
        self.last = 0.0
        self.count = 0
        self.gaps: list[float] = []

    def tokens(self, n: int) -> None:
        """``n`` new output tokens arrived now (one streamed message)."""
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        else:
            gap = (now - self.last) / n
            if n == 1:
                self.gaps.append(gap)
            else:
                self.gaps.extend([gap] * n)
        self.last = now
        self.count += n


OneRequest = Callable[[int, Recorder], Awaitable[None]]


@dataclass
class LoadResult:
    """What one load run measured."""

    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        """Output tokens per second over the whole run."""
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """The reported numbers: tokens/s, TTFT and ITL p50/p99 in milliseconds."""
        return {
            "tok_s": self.tok_s,
            "ttft_p50_ms": 1000 * percentile(self.ttft_s, 50),
            "ttft_p99_ms": 1000 * percentile(self.ttft_s, 99),
            "itl_p50_ms": 1000 * percentile(self.itl_s, 50),
            "itl_p99_ms": 1000 * percentile(self.itl_s, 99),
        }

    def details(self) -> dict[str, float | int]:
        """Counts behind the summary, for the results file."""
        return {"requests": self.requests, "tokens": self.tokens, "wall_s": self.wall_s}


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def run_load(
    one: OneRequest, concurrency: int, requests: int, expect_tokens: int | None = None
) -> LoadResult:
    """Run ``requests`` requests with ``concurrency`` in flight; check each produced ``expect_tokens``."""
    records: list[Recorder] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            index = next_index
            next_index += 1
            rec = Recorder()
            await one(index, rec)
            records.append(rec)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    wall = time.perf_counter() - start
    if expect_tokens is not None:
        short = [r.count for r in records if r.count != expect_tokens]
        if short:
            raise BenchError(
                f"{len(short)} of {requests} requests streamed a wrong number of tokens "
                f"(expected {expect_tokens} with ignore_eos, got e.g. {short[:5]})"
            )
    return LoadResult(
        concurrency=concurrency,
        requests=len(records),
        tokens=sum(r.count for r in records),
        wall_s=wall,
        ttft_s=[r.first - r.start for r in records if r.count],
        itl_s=[g for r in records for g in r.gaps],
    )
