"""The text at a seam (:mod:`expertmesh.services.expert.resume`), on a real byte-level BPE
tokenizer (the tiny demo model's): the continuation's prompt, and the text the failed replica's
detokenizer had not sent yet, which leads the resumed stream. An emoji is four byte tokens
there, so a stream can fail with part of a character generated and none of it sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from expertmesh.services.expert.resume import continuation, unsent_text
from expertmesh.v1 import expertmesh_pb2 as pb

PROMPT = "Say hi:"
ANSWER = " ok 🙂 done"


@pytest.fixture(scope="module")
def tokenizer(demo_models: list[Path]) -> Any:
    return AutoTokenizer.from_pretrained(demo_models[0])


def _streamed(tokenizer: Any, count: int) -> list[int]:
    ids: list[int] = tokenizer.encode(ANSWER, add_special_tokens=False)
    assert tokenizer.decode(ids[:4]).endswith("\ufffd") and tokenizer.decode(ids[:7]) == " ok 🙂"
    return ids[:count]


def test_a_whole_character_held_back_by_the_failed_replica_leads_the_resumed_stream(tokenizer: Any) -> None:
    base = tokenizer.encode(PROMPT)
    ids = _streamed(tokenizer, 7)  # the emoji's four tokens were generated; its text not yet sent
    assert unsent_text(tokenizer, base, pb.Resume(token_ids=ids, text=" ok ")) == "🙂"
    assert unsent_text(tokenizer, base, pb.Resume(token_ids=ids, text=" ok 🙂")) == ""  # all sent


def test_part_of_a_character_is_never_owed(tokenizer: Any) -> None:
    base = tokenizer.encode(PROMPT)
    ids = _streamed(tokenizer, 5)  # two of the emoji's four tokens: the engine sends it once whole
    assert unsent_text(tokenizer, base, pb.Resume(token_ids=ids, text=" ok ")) == ""


def test_what_the_caller_had_is_never_sent_again(tokenizer: Any) -> None:
    base = tokenizer.encode(PROMPT)
    ids = _streamed(tokenizer, 8)
    assert unsent_text(tokenizer, base, pb.Resume(token_ids=ids, text=" ok 🙂 d")) == ""
    # A text that is not what these tokens decode to (never expected): nothing is made up.
    assert unsent_text(tokenizer, base, pb.Resume(token_ids=ids, text="other")) == ""


def test_the_continuations_prompt(tokenizer: Any) -> None:
    base = tokenizer.encode(PROMPT)
    ids = _streamed(tokenizer, 7)
    same_model = pb.Resume(token_ids=ids, text=" ok ", completion_tokens=7)
    assert continuation(base, same_model, tokenizer, PROMPT, True) == [*base, *ids]  # token-exact
    other_model = pb.Resume(text=" ok 🙂", completion_tokens=7)  # only the text: re-tokenized
    assert continuation(base, other_model, tokenizer, PROMPT, True) == tokenizer.encode(PROMPT + " ok 🙂")
    assert unsent_text(tokenizer, base, other_model) == ""
