"""What an attempt's failure means, decided in one place for every path (first attempt, hedge,
resume): the replica's own fault, not its fault but another may serve, or the request's."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from expertmesh.errors import EXPERT_LIMIT, REASON_KEY

from .replica import Replica

#: The replica's own failures: they count toward its ejection.
REPLICA_FAULTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
#: Not the replica's fault, but another one may serve it.
ELSEWHERE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


@dataclass
class Tried:
    """An attempt's explicit result: ``served`` once its stream ended OK (an empty stream
    too: the expert answered, so the request is not run again elsewhere)."""

    served: bool = False


class MidStream(Exception):
    """The replica failed after the caller had its first message (its own failure)."""

    def __init__(self, link: Replica, outcome: str) -> None:
        super().__init__(outcome)
        self.link, self.outcome = link, outcome


def expert_specific(error: grpc.aio.AioRpcError) -> bool:
    """A refusal that is this expert's (it cannot serve the request), not the request's."""
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return True
    trailers = error.trailing_metadata() or ()
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT and (REASON_KEY, EXPERT_LIMIT) in tuple(trailers)
