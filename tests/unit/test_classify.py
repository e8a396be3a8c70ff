"""Automatic classification on a table of real-looking prompts: accuracy printed and held to a floor."""

from __future__ import annotations

import pytest

from expertmesh.config import MeshConfig
from expertmesh.gateway.classify import Classifier
from expertmesh.gateway.signals import MAX_CLASSIFY_CHARS

ROUTING = {
    "threshold": 0.5,
    "domains": {
        "code": {
            "code": True,
            "keywords": [
                "python",
                "javascript",
                "typescript",
                "rust",
                "golang",
                "java",
                "sql",
                "regex",
                "function",
                "compile",
                "compiler",
                "debug",
                "stack trace",
                "segfault",
                "bug",
            ],
            "examples": [
                "write a function that sorts a list",
                "why does my program crash",
                "fix this compiler error",
                "how do I reverse a string in code",
            ],
        },
        "multilingual": {
            "non_english": True,
            "examples": ["traduis ce texte en anglais", "übersetze diesen Satz"],
        },
        "general": {
            "examples": [
                "what is the capital of a country",
                "tell me a story",
                "explain how something in nature works",
                "give me advice about travel",
            ],
        },
    },
}


def mesh(embeddings: bool) -> MeshConfig:
    return MeshConfig.model_validate(
        {
            "default_domain": "general",
            "routing": {**ROUTING, "embeddings": embeddings},
            "experts": [
                {"expert_id": "g", "domain": "general", "model_path": "/m/g"},
                {"expert_id": "c", "domain": "code", "model_path": "/m/c"},
                {"expert_id": "m", "domain": "multilingual", "model_path": "/m/m"},
            ],
        }
    )


TABLE: list[tuple[str, str]] = [
    # code, several languages and shapes
    ("```python\nprint('hi')\n```", "code"),
    ("def add(a, b):\n    return a + b", "code"),
    ("Traceback (most recent call last):\n  File \"app.py\", line 3, in <module>\nKeyError: 'x'", "code"),
    ('#include <stdio.h>\nint main() { printf("hi"); return 0; }', "code"),
    ("const add = (a, b) => {\n  return a + b;\n};", "code"),
    ("fn main() {\n    let mut v = Vec::new();\n}", "code"),
    ('func main() {\n\tfmt.Println("hello")\n}', "code"),
    ("SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name;", "code"),
    ("public static void main(String[] args) {\n  System.out.println(args);\n}", "code"),
    (
        'Exception in thread "main" java.lang.NullPointerException\n    at com.acme.App.run(App.java:12)',
        "code",
    ),
    ("How do I reverse a list in Python?", "code"),
    ("My Rust program fails to compile with a borrow checker error", "code"),
    ("Write a JavaScript function that debounces another function", "code"),
    ("Why does this regex not match email addresses?", "code"),
    ("$ git rebase -i HEAD~3", "code"),
    # natural languages other than English
    ("Bonjour, pouvez-vous m'expliquer comment fonctionne la photosynthèse ?", "multilingual"),
    ("Wie spät ist es in Tokio, wenn es in Berlin Mittag ist?", "multilingual"),
    ("¿Cuál es la mejor manera de aprender a tocar la guitarra?", "multilingual"),
    ("Qual è la capitale dell'Australia e perché non è Sydney?", "multilingual"),
    ("Как приготовить борщ по рецепту моей бабушки?", "multilingual"),
    ("日本の首都はどこですか？そして人口は何人ですか？", "multilingual"),
    ("Hoe laat gaat de winkel vandaag dicht?", "multilingual"),
    ("Qual é o melhor lugar para visitar em Portugal no verão?", "multilingual"),
    ("Merhaba, bugün hava nasıl olacak?", "multilingual"),
    # plain questions in English
    ("What is the capital of Australia?", "general"),
    ("Tell me a short story about a brave mouse.", "general"),
    ("Why is the sky blue?", "general"),
    ("Give me three tips for sleeping better.", "general"),
    ("Summarise the causes of the French Revolution in two sentences.", "general"),
    ("How many planets are in the solar system?", "general"),
    ("What should I pack for a week-long hiking trip?", "general"),
    ("Explain inflation to a ten year old.", "general"),
]
FLOOR = 0.9


def accuracy(classifier: Classifier) -> tuple[float, list[str]]:
    wrong = []
    for prompt, expected in TABLE:
        got = classifier.classify(prompt)
        if got.domain != expected:
            wrong.append(
                f"{prompt[:50]!r}: expected {expected}, got {got.domain} via {got.signal} {got.votes}"
            )
    return 1 - len(wrong) / len(TABLE), wrong


def test_table_has_enough_cases() -> None:
    assert len(TABLE) >= 30
    assert {d for _, d in TABLE} == {"code", "multilingual", "general"}


def test_fast_signals_accuracy_floor() -> None:
    score, wrong = accuracy(Classifier(mesh(embeddings=False)))
    print(f"\nrules+code+language: accuracy {score:.1%} on {len(TABLE)} prompts; misses: {wrong}")
    assert score >= FLOOR, wrong


def test_with_embeddings_accuracy_floor() -> None:
    score, wrong = accuracy(Classifier(mesh(embeddings=True)))
    print(f"\nall signals incl. embeddings: accuracy {score:.1%} on {len(TABLE)} prompts; misses: {wrong}")
    assert score >= FLOOR, wrong


def test_decision_explains_itself() -> None:
    classifier = Classifier(mesh(embeddings=False))
    fenced = classifier.classify("```\nx = 1\n```")
    assert (fenced.domain, fenced.signal, fenced.confidence) == ("code", "code", 0.95)
    french = classifier.classify("Bonjour, comment allez-vous aujourd'hui ?")
    assert (french.domain, french.signal) == ("multilingual", "language")
    assert any(v.detail == "language fr" for v in french.votes)
    plain = classifier.classify("Why is the sky blue?")
    assert (plain.domain, plain.signal) == ("general", "default")


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_bounds(threshold: float) -> None:
    config = mesh(embeddings=False).model_copy(
        update={"routing": mesh(False).routing.model_copy(update={"threshold": threshold})}
    )
    result = Classifier(config).classify("How do I reverse a list in Python?")
    # keyword "python" votes code at 0.6: kept at threshold 0, below threshold 1 -> default
    assert result.domain == ("code" if threshold == 0.0 else "general")


def test_hostile_prompts_are_read_only_so_far() -> None:
    """A huge prompt is classified on its start: the same answer as its first MAX_CLASSIFY_CHARS."""
    classifier = Classifier(mesh(embeddings=False))
    head = "def reverse(s):\n    return s[::-1]\n"
    long_code = head + "x" * 500_000  # one endless word after the code
    assert classifier.classify(long_code) == classifier.classify(long_code[:MAX_CLASSIFY_CHARS])
    assert classifier.classify(long_code).domain == "code"
    one_word = "a" * 100_000  # used to take the code regexes tens of seconds
    assert classifier.classify(one_word).signal == "default"


def test_a_catastrophic_operator_pattern_is_cut_by_the_budget() -> None:
    config = MeshConfig.model_validate(
        {
            **mesh(embeddings=False).model_dump(),
            "routing": {
                "classify_budget_ms": 50,
                "domains": {"code": {"patterns": ["(a|aa)+$"], "code": True}},
            },
        }
    )
    classifier = Classifier(config)
    result = classifier.classify("a" * 60 + "!")  # exponential backtracking without a budget
    assert (result.domain, result.signal) == (config.effective_default_domain(), "default")
    budget = [v for v in result.votes if v.signal == "budget"]
    assert len(budget) == 1 and budget[0].detail.startswith("classification budget of 50 ms spent: pattern")


def test_code_lines_are_recognised_without_backtracking() -> None:
    from expertmesh.gateway.signals import _code_line

    for line in ("x = f(y)", "int main() {", "  return x;", "if (a):", "print(x);", "}"):
        assert _code_line(line), line
    for line in ("Tell me a story.", "What is (roughly) the answer", "a" * 5000 + ";"):
        assert not _code_line(line), line[:40]
