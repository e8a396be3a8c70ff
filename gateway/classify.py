"""Automatic domain classification: every signal votes, the most confident vote wins.

The rule, as documented in the README:
1. Each enabled signal (rules, code, language, embeddings) votes for at most one domain with a
   confidence in [0, 1].
2. The vote with the highest confidence decides; on a tie the earlier signal in that order wins
   (explicit rules beat heuristics, heuristics beat similarity).
3. If no vote reaches ``routing.threshold``, the request goes to the default domain.
4. Classification has ``routing.classify_budget_ms``: a signal that would start after it is
   spent, or an operator's pattern that runs past it, is not heard; the votes so far decide, and
   a ``budget`` vote in the explanation says what was cut.
All votes are kept and returned, so the route explanation shows what each signal thought.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from expertmesh.config import MeshConfig

from .signals import (
    MAX_CLASSIFY_CHARS,
    BudgetExceeded,
    CodeSignal,
    EmbeddingSignal,
    LanguageSignal,
    RulesSignal,
    Vote,
)


@dataclass(frozen=True)
class Classification:
    """The outcome: the domain, the deciding signal and its confidence, and every vote."""

    domain: str
    signal: str
    confidence: float
    votes: tuple[Vote, ...]


class Classifier:
    """The signals configured in ``routing.domains`` of one mesh config."""

    def __init__(self, config: MeshConfig) -> None:
        routing = config.routing
        self.default_domain = config.effective_default_domain()
        self.threshold = routing.threshold
        self.budget_s = routing.classify_budget_ms / 1000.0
        rules = RulesSignal(routing.domains)
        self.signals: list[RulesSignal | CodeSignal | LanguageSignal | EmbeddingSignal] = [rules]
        code = [d for d, r in routing.domains.items() if r.code]  # at most one (the config says so)
        if code:
            self.signals.append(CodeSignal(code[0]))
        foreign = [d for d, r in routing.domains.items() if r.non_english]
        if foreign:
            self.signals.append(LanguageSignal(foreign[0]))
        examples = {d: r.examples for d, r in routing.domains.items() if r.examples}
        self.embeddings = EmbeddingSignal(examples) if routing.embeddings and examples else None

    def warm(self) -> None:
        """Load the language and embedding models up front (blocking; call off the event loop)."""
        for signal in self.signals:
            if isinstance(signal, LanguageSignal):
                signal.warm()
        if self.embeddings:
            self.embeddings.warm()

    def votes(self, text: str) -> list[Vote]:
        """The fast signals' votes (rules, code, language), within the time budget."""
        text = text[:MAX_CLASSIFY_CHARS]
        deadline = time.monotonic() + self.budget_s
        votes: list[Vote] = []
        for signal in self.signals:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise BudgetExceeded(f"no time left for the {signal.name} signal")
                vote = signal.vote(text, left) if isinstance(signal, RulesSignal) else signal.vote(text)
            except BudgetExceeded as e:
                detail = f"classification budget of {self.budget_s * 1000:g} ms spent: {e}"
                votes.append(Vote("budget", self.default_domain, 0.0, detail))
                break
            if vote:
                votes.append(vote)
        return votes

    def decide(self, votes: list[Vote]) -> Classification:
        """Apply the documented rule to the votes."""
        best: Vote | None = None
        for vote in votes:  # in signal order, so a tie keeps the earlier signal
            if best is None or vote.confidence > best.confidence:
                best = vote
        if best is None or best.confidence < self.threshold:
            confidence = best.confidence if best else 0.0
            return Classification(self.default_domain, "default", confidence, tuple(votes))
        return Classification(best.domain, best.signal, best.confidence, tuple(votes))

    def classify(self, text: str) -> Classification:
        """Classify with the fast signals and, when configured, the embedding signal."""
        votes = self.votes(text)
        if self.embeddings:
            vote = self.embeddings.vote(text[:MAX_CLASSIFY_CHARS])
            if vote:
                votes.append(vote)
        return self.decide(votes)
