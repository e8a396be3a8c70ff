"""Turn a request's ``prompt`` or ``messages`` into the token ids the engine is given.

The expert tokenizes itself (with the same tokenizer vLLM loads) rather than passing text on,
so that it can check the prompt against max_model_len before the engine sees it, tell the
caller the exact numbers, serve ``Tokenize``, and do all of it while a lazy engine is cold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.errors import ExpertLimit, InvalidRequest, Unavailable, Unimplemented
from expertmesh.v1 import expertmesh_pb2 as pb

from .resume import continuation, unsent_text
from .tokenizer import load_tokenizer

#: Longer texts are tokenized in a thread so that one huge prompt does not stall other streams.
INLINE_TOKENIZE_CHARS = 4096


def render(
    prompt: str,
    messages: Sequence[pb.Message],
    tokenizer: Any,
    chat_template: str | None,
    system_prompt: str | None = None,
) -> tuple[str, bool]:
    """The text to tokenize, and whether the tokenizer should add its special tokens (BOS).

    A raw prompt gets them; a chat rendering does not, since the template writes them itself
    (as vLLM's own chat endpoint does). ``system_prompt`` (the expert's own, e.g. a code
    expert's "you write code") goes first when the messages bring no system turn.
    """
    if prompt:
        return prompt, True
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise Unimplemented(
            "this expert's model has no chat template, so messages cannot be rendered; "
            "send a raw prompt, or configure chat_template for this expert"
        )
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if system_prompt and not any(m.role == "system" for m in messages):
        turns.insert(0, {"role": "system", "content": system_prompt})
    try:
        text = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=True, chat_template=template
        )
    except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception()
        raise ExpertLimit(f"messages cannot be rendered with this expert's chat template: {e}") from e
    return str(text), False


class Prompts:
    """The expert's tokenizer (loaded on first use, engine or not) and prompt preparation."""

    def __init__(self, cfg: ExpertConfig) -> None:
        self.cfg = cfg
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    async def tokenizer(self) -> Any:
        """The tokenizer, loaded once off the event loop; UNAVAILABLE with the cause if it cannot be."""
        async with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = await asyncio.to_thread(load_tokenizer, self.cfg)
                except Exception as e:
                    source = self.cfg.tokenizer or self.cfg.model_path
                    raise Unavailable(
                        f"expert {self.cfg.expert_id} cannot load its tokenizer from {source}: "
                        f"{type(e).__name__}: {e}"
                    ) from e
        return self._tokenizer

    async def token_ids(self, prompt: str, messages: Sequence[pb.Message]) -> list[int]:
        """The prompt's token ids exactly as the engine will get them."""
        return (await self.prepare(prompt, messages))[0]

    async def prepare(
        self, prompt: str, messages: Sequence[pb.Message], resume: pb.Resume | None = None
    ) -> tuple[list[int], list[int], str]:
        """(the request prompt's token ids, the engine's prompt, text owed to the caller).

        Without ``resume`` the two id lists are the same; with one (see :mod:`.resume`) the
        engine's prompt goes on where the failed replica stopped.
        """
        tokenizer = await self.tokenizer()
        text, special = render(prompt, messages, tokenizer, self.cfg.chat_template, self.cfg.system_prompt)
        if len(text) > INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=special)
        else:
            ids = tokenizer.encode(text, add_special_tokens=special)
        if not ids:
            raise InvalidRequest("the prompt is empty after tokenization")
        base = list(ids)
        if resume is None or not (resume.token_ids or resume.text):
            return base, base, ""
        return (
            base,
            continuation(base, resume, tokenizer, text, special),
            unsent_text(tokenizer, base, resume),
        )
