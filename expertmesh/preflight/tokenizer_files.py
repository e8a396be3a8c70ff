"""Tokenizer checks: a tokenizer transformers can build, a readable tokenizer_config.json, a chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertmesh.config import ExpertConfig
from expertmesh.preflight.findings import Finding, error, warning
from expertmesh.preflight.jsonfile import looks_like_whole_json, read_json

#: Files any of which gives transformers a tokenizer (fast JSON, SentencePiece, tiktoken, Mistral).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tekken.json", "vocab.txt")
#: Files that carry a chat template besides tokenizer_config.json.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass
class TokenizerReport:
    """What the tokenizer check found."""

    findings: list[Finding] = field(default_factory=list)
    tokenizer_config: dict[str, Any] | None = None


def check_tokenizer(cfg: ExpertConfig, model_dir: Path, result: TokenizerReport) -> None:
    """Tokenizer files (of the model folder, or of ``tokenizer:``), tokenizer_config.json, chat template."""
    folder = model_dir
    if cfg.tokenizer:
        folder = Path(cfg.tokenizer).expanduser()
        if not folder.is_dir():
            result.findings.append(
                error(
                    "tokenizer-missing",
                    f"tokenizer folder {cfg.tokenizer} does not exist",
                    "correct tokenizer: (or remove it to use the tokenizer in the model folder)",
                )
            )
            return
    names = {p.name for p in folder.iterdir()}
    has_bpe_pair = "vocab.json" in names and "merges.txt" in names
    has_tiktoken = any(n.endswith(".tiktoken") for n in names)
    if not (names & set(TOKENIZER_FILES) or has_bpe_pair or has_tiktoken):
        result.findings.append(
            error(
                "tokenizer-missing",
                f"no tokenizer in {folder} (looked for {', '.join(TOKENIZER_FILES)}, "
                "vocab.json + merges.txt, *.tiktoken)",
                f"copy the tokenizer files from the model's repository into {folder}, or set tokenizer: to a "
                "folder that has them",
            )
        )
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file() and not looks_like_whole_json(tok_json):
        result.findings.append(
            error(
                "tokenizer-invalid",
                f"{tok_json} is empty or truncated (it does not end with the closing brace of a JSON object)",
                "download tokenizer.json again from the model's repository",
            )
        )
    tok_cfg_path = folder / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        data, problem = read_json(
            tok_cfg_path,
            "tokenizer config",
            "tokenizer-config-invalid",
            "repair or download tokenizer_config.json again",
        )
        if problem:
            result.findings.append(problem)
        elif isinstance(data, dict):
            result.tokenizer_config = data
    has_template = bool(cfg.chat_template) or bool(names & set(CHAT_TEMPLATE_FILES))
    has_template = has_template or bool(
        result.tokenizer_config and result.tokenizer_config.get("chat_template")
    )
    if not has_template:
        result.findings.append(
            warning(
                "chat-template-missing",
                "the model has no chat template (none in tokenizer_config.json, no chat_template.jinja): "
                "requests with messages will fail, raw prompts still work",
                "set chat_template: for this expert, or add chat_template.jinja to the model folder",
            )
        )
