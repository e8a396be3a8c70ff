"""A continuation (``GenerateRequest.resume``): what this expert generates when another replica
failed after the caller had part of the answer.

Same model (``resume.token_ids``): the engine's prompt is the request's prompt followed by the
tokens already streamed, so a greedy answer goes on token for token as if nothing had happened.
What the failed replica's detokenizer still held back (the bytes of a character not yet
complete) was never sent: :func:`unsent_text` finds it, and it leads the first message.
Another model (``resume.text`` only): the text streamed so far is appended to the rendered
prompt and tokenized with this model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from expertmesh.v1 import expertmesh_pb2 as pb


def continuation(
    base_ids: list[int], resume: pb.Resume, tokenizer: Any, rendered: str, special: bool
) -> list[int]:
    """The engine's prompt for a continuation of a prompt that tokenized to ``base_ids``."""
    if resume.token_ids:
        return [*base_ids, *resume.token_ids]
    return list(tokenizer.encode(rendered + resume.text, add_special_tokens=special))


def unsent_text(tokenizer: Any, base_ids: list[int], resume: pb.Resume) -> str:
    """The text of the streamed tokens that the caller has not had yet (same-model resumes)."""
    if not resume.token_ids:
        return ""
    base = tokenizer.decode(base_ids, skip_special_tokens=True)
    full = tokenizer.decode([*base_ids, *resume.token_ids], skip_special_tokens=True)
    if not full.startswith(base):
        return ""
    # An incomplete character at the end decodes as U+FFFD; the engine will send it once whole.
    text = full[len(base) :].rstrip("\ufffd")
    return text[len(resume.text) :] if text.startswith(resume.text) else ""
