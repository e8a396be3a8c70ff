"""Build the tiny demo models locally: no model hub is needed (or reachable).

Each demo model is a real Hugging Face model directory (config.json, safetensors weights,
a trained BPE tokenizer with a chat template) that vLLM loads like any other. The weights
are random, so the text is random too; the serving path is exactly the production one.
Point a config at real weights to get real answers (see README).
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Where the demo config expects the models (``configs/demo.yaml`` refers to these paths).
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / ".models"

#: A minimal chat template so that ``messages`` requests work on the demo models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

#: name -> (architecture, corpus). Shapes follow the CPU attention backend's limits
#: (head_dim 64; it refuses head_dim 16).
DEMO_MODELS = {
    "demo-general": ("llama", "prose"),
    "demo-code": ("qwen2", "code"),
}

_FALLBACK_TEXT = "The quick brown fox jumps over the lazy dog. def main():\n    return 0\n" * 200


def _corpus(kind: str, limit_bytes: int = 3_000_000) -> Iterator[str]:
    """Text that every machine of this kind has: licences for prose, the stdlib for code."""
    if kind == "code":
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    else:
        files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
        files += sorted(Path(sysconfig.get_paths()["stdlib"]).glob("../../share/man/man1/*"))
    total = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        total += len(text)
        yield text
        if total >= limit_bytes:
            return
    if total == 0:
        yield _FALLBACK_TEXT


def _train_tokenizer(kind: str, vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(kind), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(out_dir: Path, arch: str = "llama", corpus: str = "prose", seed: int = 0) -> Path:
    """Write one tiny model (2 layers, hidden 128, 2 heads of 64) with its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tokenizer(corpus, vocab_size=2048)
    vocab = len(tokenizer)  # type: ignore[arg-type]
    shape = dict(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel = (
        Qwen2ForCausalLM(Qwen2Config(**shape)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape))
    )
    model = model.to(dtype=torch.bfloat16)  # type: ignore[arg-type,call-arg]
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)  # type: ignore[attr-defined]
    (tmp / "expertmesh-demo.json").write_text(json.dumps({"arch": arch, "corpus": corpus, "seed": seed}))
    # Rename last so that a half-written model is never mistaken for a complete one.
    tmp.rename(out_dir)
    return out_dir


def demo_expert(expert_id: str, domain: str, model: str, port: int, **extra: Any) -> dict[str, Any]:
    """A mesh-config expert entry on one of the demo models, sized for a small CPU host."""
    return {
        "expert_id": expert_id,
        "domain": domain,
        "model_path": str(DEFAULT_MODELS_DIR / model),
        "dtype": "bfloat16",
        "max_model_len": 1024,
        "kv_cache_space_gib": 1,
        "enforce_eager": True,
        "port": port,
        **extra,
    }


def ensure_demo_models(models_dir: Path = DEFAULT_MODELS_DIR, log: bool = True) -> list[Path]:
    """Build every demo model that is missing; return their directories."""
    models_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, (arch, corpus)) in enumerate(DEMO_MODELS.items()):
        path = models_dir / name
        if not (path / "config.json").exists():
            if log:
                print(f"building demo model {name} ({arch}) in {path} ...", flush=True)
            build_model(path, arch=arch, corpus=corpus, seed=i)
        paths.append(path)
    return paths
