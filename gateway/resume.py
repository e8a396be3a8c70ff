"""Resume mid-stream: the policy and the bookkeeping, apart from the forwarder that runs it.

When the replica serving a stream fails after the caller had tokens (its own failure: it died,
answered UNAVAILABLE, its engine stalled), the request goes on elsewhere as a continuation
(``GenerateRequest.resume``): the tokens streamed so far, so that the next replica generates
what follows and the caller sees one stream. ``routing.resume`` (per domain:
``routing.domains.D.resume``) says where: ``same_model`` (another replica of the expert, or an
expert with the same model: token-exact), ``any`` (then any other candidate, re-tokenizing the
text), ``off``. At most ``routing.max_resumes`` per stream; never once the caller's deadline
has passed or the caller cancelled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from expertmesh.config import ExpertConfig, RoutingConfig
from expertmesh.v1 import expertmesh_pb2 as pb

from .link import ExpertLink
from .pool import Pool
from .replica import Replica


def policy(routing: RoutingConfig, domain: str) -> str:
    """``same_model``, ``any`` or ``off`` for a request routed to ``domain``."""
    rules = routing.domains.get(domain)
    return rules.resume if rules is not None and rules.resume is not None else routing.resume


class Streamed:
    """What the caller has had so far: token ids, text, the number of tokens."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self._text: list[str] = []

    def add(self, msg: pb.GenerateResponse) -> None:
        """Account one message sent to the caller."""
        self.token_ids.extend(msg.token_ids)
        if msg.text:
            self._text.append(msg.text)

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(self._text)

    def continuation(self, request: pb.GenerateRequest, same_model: bool) -> pb.GenerateRequest:
        """The request to send on: the original, resuming after what was streamed."""
        resumed = pb.GenerateRequest()
        resumed.CopyFrom(request)
        resumed.resume.text = self.text
        resumed.resume.completion_tokens = len(self.token_ids)
        if same_model:
            resumed.resume.token_ids.extend(self.token_ids)
        return resumed


def targets(
    pool: Pool, experts: Sequence[ExpertConfig], failed: Replica, mode: str
) -> Iterator[tuple[ExpertConfig, ExpertLink, bool]]:
    """Where to resume, best first: (expert, replica, same model?).

    Available replicas of the failed expert, least outstanding first; then the candidates with
    the same model; with ``any``, then every other candidate (the text is re-tokenized there).
    """
    by_id = {e.expert_id: e for e in experts}
    model = by_id[failed.expert_id].model_path if failed.expert_id in by_id else None
    same = [e for e in experts if e.model_path == model]
    ordered = sorted(same, key=lambda e: e.expert_id != failed.expert_id)  # its own replicas first
    others = [e for e in experts if e.model_path != model] if mode == "any" else []
    for expert in [*ordered, *others]:
        links = [x for x in pool.of(expert.expert_id) if x is not failed and x.available()]
        for link in sorted(links, key=lambda x: x.outstanding):
            yield expert, link, expert.model_path == model
