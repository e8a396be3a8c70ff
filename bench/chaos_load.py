"""The chaos suite's load: N greedy streams through the gateway, each request with a deadline,
a new one as soon as one ends; every request's outcome recorded, then summarised per scenario.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .chaos_mesh import CHANNEL_OPTIONS

#: Ending this much after its deadline is scheduling noise on a busy host, not a hang.
DEADLINE_SLACK_S = 0.5
#: A request still running this long after its deadline counts as hung and is abandoned.
HANG_GRACE_S = 10.0
#: A client's pause after a request failed without a token before its next one: without it, 16
#: callers would spin on a refused gateway and the counts would say more about the loop than the mesh.
RETRY_PAUSE_S = 0.2
PROMPTS = ("def fibonacci(n):", "class Stack:\n    def push(self, x):", "import os\n\ndef walk(path):")


@dataclass
class Outcome:
    """One request: when it was sent, got its first token, ended; how it ended."""

    sent_at: float
    deadline_s: float
    ended_at: float = 0.0
    first_token_at: float | None = None
    code: str = ""  # a grpc.StatusCode name, OK, or HANG (the harness gave up on it)
    details: str = ""
    tokens: int = 0
    expert_id: str = ""
    failed_attempts: int = 0  # attempts the gateway made before the one that streamed (its route says)
    seam_gaps_s: list[float] = field(default_factory=list)  # per resume: the pause the caller saw


@dataclass
class Load:
    """``streams`` callers to ``domain`` through the gateway until :meth:`stop`."""

    target: str
    streams: int = 16
    deadline_s: float = 20.0
    tokens: tuple[int, int] = (32, 64)
    domain: str = "code"
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    async def run(self) -> None:
        """Run every caller until :meth:`stop`; each finishes the request it is in."""
        async with grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.GatewayStub(channel)
            await asyncio.gather(*(self._caller(stub, i) for i in range(self.streams)))

    def stop(self) -> None:
        """Send no new request; :meth:`run` returns once the ones in flight have ended."""
        self._stop.set()

    async def _caller(self, stub: pb_grpc.GatewayStub, index: int) -> None:
        while not self._stop.is_set():
            request = pb.GenerateRequest(
                prompt=PROMPTS[index % len(PROMPTS)],
                domain=self.domain,
                sampling=pb.SamplingParams(
                    max_tokens=self._rng.randint(*self.tokens), temperature=0.0, ignore_eos=True
                ),
            )
            outcome = Outcome(sent_at=time.monotonic(), deadline_s=self.deadline_s)
            self.outcomes.append(outcome)
            try:
                await asyncio.wait_for(self._one(stub, request, outcome), self.deadline_s + HANG_GRACE_S)
            except TimeoutError:
                outcome.code, outcome.details = "HANG", f"no status {HANG_GRACE_S:g} s after the deadline"
            outcome.ended_at = time.monotonic()
            if outcome.code != "OK" and outcome.first_token_at is None:
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _one(self, stub: pb_grpc.GatewayStub, request: pb.GenerateRequest, outcome: Outcome) -> None:
        call = stub.Generate(request, timeout=self.deadline_s)
        last = time.monotonic()
        try:
            async for msg in call:
                now = time.monotonic()
                if len(msg.route.seams) > len(outcome.seam_gaps_s):  # resumed elsewhere
                    outcome.seam_gaps_s.append(now - last)
                last = now
                if msg.token_ids and outcome.first_token_at is None:
                    outcome.first_token_at = now
                if msg.HasField("route") and not msg.route.seams:  # the attempts before this one
                    outcome.failed_attempts = sum(
                        not a.outcome.startswith("skipped") for a in msg.route.attempts
                    )
                outcome.tokens += len(msg.token_ids)
                outcome.expert_id = msg.expert_id or outcome.expert_id
            outcome.code = "OK"
        except grpc.aio.AioRpcError as e:
            outcome.code, outcome.details = e.code().name, e.details() or ""
        finally:
            call.cancel()


def summarise(
    outcomes: list[Outcome], fault_at: float, path_at: Callable[[float], bool], goal_s: float
) -> dict[str, Any]:
    """The figures of one scenario.

    ``path_at(t)``: whether, at ``t``, the gateway answered SERVING and some candidate expert did
    (a request that failed then without a token was lost while a healthy candidate existed).
    Recovery: from the fault until the first request sent after it (and after the last request
    since then that failed) gets its first token, of an answer that completes OK.
    """
    failed = [o for o in outcomes if o.code != "OK"]
    no_token = [o for o in failed if o.first_token_at is None]
    lost = [o for o in no_token if path_at(o.ended_at)]
    # The outage ends with the first success sent after the last failure sent since the fault: a
    # gateway that drains still serves its first requests, then refuses until it is back.
    since = [o for o in outcomes if o.sent_at >= fault_at]
    outage_from = max([fault_at, *(o.sent_at for o in since if o.code != "OK")])
    after = sorted((o for o in since if o.sent_at >= outage_from and o.code == "OK"), key=lambda o: o.sent_at)
    # Served again: that request's first token (its whole length is the load's, not the mesh's).
    recover_s = round((after[0].first_token_at or after[0].ended_at) - fault_at, 3) if after else None
    past = [o.ended_at - o.sent_at - o.deadline_s for o in outcomes]
    gaps = sorted(g * 1000 for o in outcomes for g in o.seam_gaps_s)
    return {
        "resumed": sum(bool(o.seam_gaps_s) for o in outcomes),
        "seam_ms_p50": round(gaps[len(gaps) // 2], 1) if gaps else None,
        "seam_ms_p99": round(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))], 1) if gaps else None,
        "sent": len(outcomes),
        "completed": len(outcomes) - len(failed),
        "failed_by_code": dict(sorted(Counter(o.code for o in failed).items())),
        "failed_over": sum(o.failed_attempts > 0 for o in outcomes),
        "cut_after_first_token": len(failed) - len(no_token),
        "lost_without_token": len(lost),
        "failed_without_path": len(no_token) - len(lost),
        "hangs": sum(o.code == "HANG" for o in outcomes),
        "max_past_deadline_s": round(max([0.0, *past]), 3),
        "recover_s": recover_s,
        "recover_goal_s": goal_s,
        "recovered_by": after[0].expert_id if after else "",
        "served_by": dict(sorted(Counter(o.expert_id for o in outcomes if o.code == "OK").items())),
        "examples": {o.code: o.details[:300] for o in failed},
        "goals": {
            "no_request_lost": not lost,
            "no_hang_past_deadline": all(p <= DEADLINE_SLACK_S for p in past),
            "recovery": recover_s is not None and recover_s <= goal_s,
        },
    }
