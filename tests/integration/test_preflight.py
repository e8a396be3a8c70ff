"""Preflight (`expertmesh check`): every failure class of the original system, read off real files.

Each test builds a model folder (config.json, tokenizer files, safetensors shards, cut or
mismatched where the test needs it) and asserts the finding's code and its fix. The five
production models are imitated by folders with their published config.json and sparse shards
of their real size. No weights are loaded; the facts come from the installed vLLM.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

import expertmesh.config as mesh_config
from expertmesh.config import ExpertConfig, MeshConfig, parse_config
from expertmesh.preflight import (
    CONFIG_KEY,
    MESH_KEY,
    Finding,
    check_expert,
    check_mesh,
    main_check,
    render_findings,
)
from expertmesh.preflight.config_checks import load_for_check
from expertmesh.preflight.device import GiB
from expertmesh.procs import free_port

from ..preflight_fixtures import (
    GEMMA3_27B_IT,
    MISTRAL_7B_AWQ,
    cpu_host,
    gpu_host,
    llama_config,
    tiny_tensors,
    write_model,
    write_production_models,
    write_sharded,
    write_sparse_weights,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks read these; a developer's shell must not change the verdicts."""
    for name in (
        "VLLM_CPU_KVCACHE_SPACE",
        "EXPERTMESH_CONFIG",
        "VLLM_CONFIG_PATH",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")


def expert(model_path: Path | str, **fields: Any) -> ExpertConfig:
    fields.setdefault("expert_id", "e1")
    fields.setdefault("domain", "general")
    return ExpertConfig(model_path=str(model_path), **fields)


def find(findings: list[Finding], code: str) -> Finding:
    matches = [f for f in findings if f.code == code]
    assert matches, f"no {code!r} in {[(f.code, str(f)) for f in findings]}"
    return matches[0]


def codes(findings: list[Finding], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity == severity}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- 1. the config itself --------------------------------------------------------------------------------


def test_config_path_and_reason_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = write_model(tmp_path / "m")
    cfg = write_yaml(
        tmp_path / "mesh.yaml", f"experts:\n  - {{expert_id: a, domain: general, model_path: {model}}}\n"
    )
    _, source, findings = load_for_check(str(cfg))
    assert source.reason == "--config"
    assert find(findings, "config-source").cause == f"config: {cfg} (from --config)"

    monkeypatch.setenv("VLLM_CONFIG_PATH", str(cfg))
    config, source, findings = load_for_check(None)
    assert config is not None and source.reason == "VLLM_CONFIG_PATH"
    assert codes(findings) == {"config-source"}


def test_missing_config_names_where_the_path_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.yaml"
    _, _, findings = load_for_check(str(missing))
    f = find(findings, "config-missing")
    assert str(missing) in f.cause and f.fix == "check the path given to --config"

    monkeypatch.setenv("EXPERTMESH_CONFIG", str(missing))
    f = find(load_for_check(None)[2], "config-missing")
    assert f.fix.startswith("EXPERTMESH_CONFIG names a file that does not exist")

    monkeypatch.delenv("EXPERTMESH_CONFIG")
    monkeypatch.setattr(mesh_config, "DEFAULT_CONFIG", missing)
    f = find(load_for_check(None)[2], "config-missing")
    assert f.fix == "create it, or name a config with --config FILE or EXPERTMESH_CONFIG"


def test_unreadable_config(tmp_path: Path) -> None:
    folder = tmp_path / "mesh.yaml"
    folder.mkdir()  # a folder where the file should be: reading it fails
    f = find(load_for_check(str(folder))[2], "config-unreadable")
    assert "cannot be read" in f.cause and f.fix == "make the file readable by this user"


def test_invalid_yaml_and_json_give_line_and_column(tmp_path: Path) -> None:
    bad_yaml = write_yaml(tmp_path / "mesh.yaml", "experts:\n  - expert_id: a\n    domain: [general\n")
    f = find(load_for_check(str(bad_yaml))[2], "config-syntax")
    assert "invalid YAML" in f.cause and f.fix.startswith("correct the syntax at line ")

    bad_json = write_yaml(tmp_path / "mesh.json", '{"experts": [\n  {"expert_id": "a",}\n]}')
    f = find(load_for_check(str(bad_json))[2], "config-syntax")
    assert f.fix == "correct the syntax at line 2 column 21"


def test_misspelt_keys_suggest_the_valid_one(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "mesh.yaml",
        "experts:\n  - {expert_id: a, domain: general, model_path: /m, dtpye: float16, max_model_lenght: 9}\n"
        "gatway: {port: 1}\n",
    )
    findings = load_for_check(str(cfg))[2]
    fixes = {f.fix for f in findings if f.code == "config-unknown-key"}
    assert fixes == {
        "rename 'dtpye' to 'dtype'",
        "rename 'max_model_lenght' to 'max_model_len'",
        "rename 'gatway' to 'gateway'",
    }


def test_mesh_consistency_errors(tmp_path: Path) -> None:
    dupes = write_yaml(
        tmp_path / "dupes.yaml",
        "experts:\n  - {expert_id: a, domain: general, model_path: /m}\n"
        "  - {expert_id: a, domain: code, model_path: /m}\n",
    )
    f = find(load_for_check(str(dupes))[2], "config-duplicate-id")
    assert "a" in f.cause and f.fix == "give every expert a unique expert_id"

    ports = write_yaml(
        tmp_path / "ports.yaml",
        "experts:\n  - {expert_id: a, domain: general, model_path: /m, port: 6000}\n"
        "  - {expert_id: b, domain: code, model_path: /m, port: 6000}\n",
    )
    assert find(load_for_check(str(ports))[2], "config-duplicate-port").fix.startswith(
        "give each expert its own port"
    )

    no_expert = write_yaml(
        tmp_path / "domain.yaml",
        "default_domain: legal\nexperts:\n  - {expert_id: a, domain: general, model_path: /m}\n",
    )
    f = find(load_for_check(str(no_expert))[2], "config-default-domain")
    assert "legal" in f.cause and f.fix == "set default_domain to a domain one of the experts serves"

    fallback_domain = write_yaml(
        tmp_path / "fb1.yaml",
        "routing: {fallbacks: {math: [general]}}\n"
        "experts:\n  - {expert_id: a, domain: general, model_path: /m}\n",
    )
    f = find(load_for_check(str(fallback_domain))[2], "config-fallback-domain")
    assert "math" in f.cause and "add an expert that serves it" in f.fix

    fallback_unknown = write_yaml(
        tmp_path / "fb2.yaml",
        "routing: {fallbacks: {general: [ghost]}}\n"
        "experts:\n  - {expert_id: a, domain: general, model_path: /m}\n",
    )
    f = find(load_for_check(str(fallback_unknown))[2], "config-fallback-unknown")
    assert "ghost" in f.cause and f.fix == "name only domains or expert_ids of this mesh in the chain"


def test_invalid_value(tmp_path: Path) -> None:
    cfg = write_yaml(
        tmp_path / "mesh.yaml",
        "experts:\n  - {expert_id: a, domain: general, model_path: /m, max_model_len: -5}\n",
    )
    f = find(load_for_check(str(cfg))[2], "config-invalid")
    assert "greater than 0" in f.cause and f.fix == "correct experts.0.max_model_len in the config"


def test_every_problem_of_one_error_becomes_a_finding(tmp_path: Path) -> None:
    """load_config lists several problems in one ConfigError; each gets its own finding and fix."""
    from expertmesh.config import ConfigError, ConfigSource
    from expertmesh.preflight.config_checks import config_error_findings

    err = ConfigError(
        "invalid config mesh.yaml:\n"
        "  (top level): Value error, duplicate expert_id: a\n"
        "  (top level): Value error, expert port 8080 is also the gateway port\n"
        "  unknown key 'experts.0.quantisation' (did you mean 'quantization'?)"
    )
    findings = config_error_findings(err, ConfigSource(tmp_path / "mesh.yaml", "--config"))
    assert [f.code for f in findings] == ["config-duplicate-id", "config-port-gateway", "config-unknown-key"]
    assert findings[2].fix == "rename 'quantisation' to 'quantization'"


# --- 2. model files -----------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path: Path) -> None:
    findings = check_expert(expert(tmp_path / "absent"), device=cpu_host())
    f = find(findings, "model-missing")
    assert f.severity == "error" and "hf download" in f.fix and str(tmp_path / "absent") in f.fix


def test_model_path_that_is_a_file_or_a_hub_id(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    assert (
        find(check_expert(expert(tmp_path / "model.bin"), device=cpu_host()), "model-not-dir").severity
        == "error"
    )
    f = find(check_expert(expert("no-such-org/no-such-model"), device=cpu_host()), "model-not-local")
    assert f.severity == "warning" and "--local-dir DIR" in f.fix


def test_config_json_missing_invalid_or_unusable(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    (folder / "config.json").unlink()
    f = find(check_expert(expert(folder), device=cpu_host()), "config-json-missing")
    assert f.fix == "copy config.json from the model's repository into the model folder"

    (folder / "config.json").write_text(
        '{\n  "architectures": ["LlamaForCausalLM"],\n  "model_type": llama\n}'
    )
    f = find(check_expert(expert(folder), device=cpu_host()), "config-json-invalid")
    assert "line 3 column 17" in f.cause and f.fix == "repair config.json or download it again"

    (folder / "config.json").write_text(json.dumps(llama_config(model_type="no_such_model_type")))
    f = find(check_expert(expert(folder), device=cpu_host()), "config-json-unusable")
    assert "no_such_model_type" in f.cause


def test_tokenizer_missing_truncated_and_no_chat_template(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", tokenizer=False)
    f = find(check_expert(expert(folder), device=cpu_host()), "tokenizer-missing")
    assert "copy the tokenizer files" in f.fix

    folder = write_model(tmp_path / "m2", chat_template=False)
    tok = folder / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:20])
    findings = check_expert(expert(folder), device=cpu_host())
    assert (
        find(findings, "tokenizer-invalid").fix == "download tokenizer.json again from the model's repository"
    )
    f = find(findings, "chat-template-missing")
    assert f.severity == "warning" and "set chat_template:" in f.fix
    # a template in the expert's config is enough
    assert "chat-template-missing" not in codes(
        check_expert(expert(folder, chat_template="{{x}}"), device=cpu_host())
    )


def test_no_weights(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    f = find(check_expert(expert(folder), device=cpu_host()), "weights-missing")
    assert "download the model's *.safetensors files" in f.fix


def test_truncated_shard(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    f = find(check_expert(expert(folder), device=cpu_host()), "weights-truncated")
    assert "truncated" in f.cause
    assert (
        f.fix == "download model.safetensors again and check that its size matches the repository's listing"
    )


def test_index_naming_an_absent_shard(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    tensors = tiny_tensors()
    names = sorted(tensors)
    write_sharded(
        folder,
        {"model-00001-of-00002.safetensors": {n: tensors[n] for n in names[:1]}},
        {
            names[0]: "model-00001-of-00002.safetensors",
            **{n: "model-00002-of-00002.safetensors" for n in names[1:]},
        },
    )
    f = find(check_expert(expert(folder), device=cpu_host()), "weights-shard-missing")
    assert "model-00002-of-00002.safetensors" in f.cause
    assert f.fix.startswith("download the missing shard(s) into the model folder")


def test_index_and_shards_from_different_revisions(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    tensors = tiny_tensors()
    index = dict.fromkeys(tensors, "model-00001-of-00001.safetensors")
    index["model.norm.weight"] = "model-00001-of-00001.safetensors"  # the shard does not hold it
    write_sharded(folder, {"model-00001-of-00001.safetensors": tensors}, index)
    shard = (folder / "model-00001-of-00001.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(shard)  # left from a single-file revision
    (folder / "consolidated.safetensors").write_bytes(shard)  # Mistral ships its own format beside: fine
    findings = check_expert(expert(folder), device=cpu_host())
    f = find(findings, "weights-index-mismatch")
    assert "'model.norm.weight'" in f.cause and "download both again from one revision" in f.fix
    f = find(findings, "weights-unreferenced")
    assert f.severity == "warning" and f.cause.startswith("model.safetensors is not named in")
    assert "consolidated" not in f.cause


def test_corrupt_shard_header(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    f = find(check_expert(expert(folder), device=cpu_host()), "weights-corrupt")
    assert "download model.safetensors again" in f.fix


def test_pickle_and_dummy_weights(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 1024)
    f = find(
        check_expert(expert(folder, max_model_len=1024, kv_cache_space_gib=1), device=cpu_host()),
        "weights-pickle",
    )
    assert f.severity == "info" and "prefer the safetensors files" in f.fix
    (folder / "pytorch_model.bin").unlink()
    findings = check_expert(expert(folder, engine_args={"load_format": "dummy"}), device=cpu_host())
    assert "weights-dummy" in codes(findings) and "weights-missing" not in codes(findings)


def test_complete_tiny_model_has_no_problems(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    findings = check_expert(
        expert(folder, dtype="bfloat16", max_model_len=1024, kv_cache_space_gib=1), device=cpu_host()
    )
    assert codes(findings) == {"memory-summary"}, findings
    assert str(findings[0]) == findings[0].cause  # an info has no fix, so no " — "


# --- 3. architecture ------------------------------------------------------------------------------------


def test_architecture_unknown_to_vllm(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", llama_config(architectures=["LlamaForCausalLm"]))
    f = find(check_expert(expert(folder), device=cpu_host()), "arch-unsupported")
    assert (
        "LlamaForCausalLm is not supported" in f.cause
        and "close supported names: LlamaForCausalLM" in f.cause
    )
    assert "upgrade vLLM" in f.fix


def test_architecture_only_transformers_knows(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", llama_config(architectures=["HeliumForCausalLM"]))
    f = find(check_expert(expert(folder), device=cpu_host()), "arch-transformers-backend")
    assert f.severity == "warning" and "model_impl: transformers" in f.fix


def test_architecture_list_missing(tmp_path: Path) -> None:
    config = llama_config()
    del config["architectures"]
    folder = write_model(tmp_path / "m", config)
    f = find(check_expert(expert(folder), device=cpu_host()), "architectures-missing")
    assert "vLLM would load LlamaModel" in f.cause and "cannot generate text" in f.cause
    assert f.fix.startswith('add "architectures": ["<ModelClass>"] to config.json')


# --- 4. dtype x quantization x device ----------------------------------------------------------------------


def awq_model(folder: Path, config: dict[str, Any] | None = None) -> Path:
    return write_model(
        folder,
        config
        or llama_config(quantization_config=MISTRAL_7B_AWQ["quantization_config"], torch_dtype="float16"),
    )


def test_awq_outside_its_dtypes(tmp_path: Path) -> None:
    folder = awq_model(tmp_path / "m")
    f = find(check_expert(expert(folder, dtype="float32"), device=gpu_host()), "quant-dtype")
    assert "awq" in f.cause and "float32" in f.cause
    assert f.fix == "set dtype: float16 for this expert (awq kernels run in float16, bfloat16)"
    # the installed vLLM runs AWQ in bfloat16 too
    assert "quant-dtype" not in codes(check_expert(expert(folder, dtype="bfloat16"), device=gpu_host()))


@pytest.fixture
def awq_float16_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vLLM the original system ran: its AWQ kernels accepted float16 activations only."""
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

    monkeypatch.setattr(AutoAWQConfig, "get_supported_act_dtypes", classmethod(lambda cls: [torch.float16]))


@pytest.mark.usefixtures("awq_float16_only")
def test_awq_asked_for_bfloat16_on_a_float16_only_vllm(tmp_path: Path) -> None:
    folder = awq_model(tmp_path / "m")
    f = find(
        check_expert(expert(folder, quantization="awq", dtype="bfloat16"), device=gpu_host()), "quant-dtype"
    )
    assert (
        f.cause == "dtype: bfloat16 is set for this expert, but the installed vLLM runs awq only in float16"
    )
    assert f.fix == "set dtype: float16 for this expert (awq kernels run in float16)"


@pytest.mark.usefixtures("awq_float16_only")
def test_gemma3_awq_has_no_dtype_that_fits_both(tmp_path: Path) -> None:
    """The original Gemma 3 case: Gemma refuses float16, AWQ ran only in float16."""
    config = json.loads(json.dumps(GEMMA3_27B_IT))
    config["quantization_config"] = MISTRAL_7B_AWQ["quantization_config"]
    folder = write_model(tmp_path / "gemma-awq", config)
    findings = check_expert(expert(folder, quantization="awq", max_model_len=8192), device=gpu_host())
    f = find(findings, "quant-dtype")
    assert "dtype: auto takes the checkpoint's bfloat16" in f.cause
    assert f.fix.startswith(
        "no dtype satisfies both: gemma3 cannot run in float16 and awq kernels run only in float16"
    )
    # and asking for float16 instead is refused by vLLM's own Gemma rule
    f = find(
        check_expert(expert(folder, quantization="awq", dtype="float16"), device=gpu_host()), "dtype-model"
    )
    assert "does not support float16" in f.cause


def test_gemma3_in_float16_is_refused(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "gemma", GEMMA3_27B_IT)
    f = find(
        check_expert(expert(folder, dtype="float16", max_model_len=4096), device=gpu_host()), "dtype-model"
    )
    assert "Numerical instability" in f.cause and f.fix == "set dtype: bfloat16 for this expert"


def test_declared_quantization_against_the_checkpoint(tmp_path: Path) -> None:
    folder = awq_model(tmp_path / "awq")
    f = find(check_expert(expert(folder, quantization="gptq"), device=gpu_host()), "quant-mismatch")
    assert "checkpoint's quantization_config says awq" in f.cause and f.fix.startswith(
        "set quantization: awq"
    )
    assert "quant-mismatch" not in codes(
        check_expert(expert(folder, quantization="awq_marlin"), device=gpu_host())
    )

    plain = write_model(tmp_path / "plain")
    f = find(check_expert(expert(plain, quantization="awq"), device=gpu_host()), "quant-not-in-model")
    assert "quantize_config.json, quant_config.json" in f.cause and f.fix.startswith("remove quantization:")

    f = find(check_expert(expert(plain, quantization="awk"), device=gpu_host()), "quant-unknown")
    assert f.fix == "set quantization: awq"


def test_quantization_the_device_cannot_run(tmp_path: Path) -> None:
    fp8 = write_model(
        tmp_path / "fp8",
        llama_config(quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
    )
    f = find(check_expert(expert(fp8), device=cpu_host()), "quant-device")
    assert "fp8 quantization has no kernels in vLLM's CPU backend" in f.cause
    assert f.fix.startswith("run this expert on a GPU host")
    assert "quant-device" not in codes(check_expert(expert(fp8), device=gpu_host()))

    awq = awq_model(tmp_path / "awq")
    assert not codes(check_expert(expert(awq), device=cpu_host()), "error")  # CPU runs AWQ
    f = find(check_expert(expert(awq), device=gpu_host(capability=70)), "quant-capability")
    assert "needs GPU compute capability 7.5" in f.cause and "this GPU has 7.0" in f.cause


# --- 5. memory --------------------------------------------------------------------------------------------


def big_llama(**overrides: Any) -> dict[str, Any]:
    """Llama-3-8B-shaped: 32 layers, 8 KV heads of 128."""
    return llama_config(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=32,
        max_position_embeddings=131072,
        **overrides,
    )


def test_kv_cache_too_small_gives_the_largest_fitting_length(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", big_llama())
    cfg = expert(folder, dtype="bfloat16", max_model_len=131072, kv_cache_space_gib=1)
    f = find(check_expert(cfg, device=cpu_host()), "kv-cache-too-small")
    per_token = 2 * 32 * 8 * 128 * 2  # 2 x layers x kv_heads x head_dim x bf16
    reserved = per_token * 128  # one 128-token CPU block per layer kept back by vLLM's pool
    largest = (GiB - reserved) // per_token // 128 * 128
    needed_gib = math.ceil((131072 * per_token + reserved) / GiB)
    assert (largest, needed_gib) == (8064, 17)
    assert "128 KiB/token over 32 layers" in f.cause and "kv_cache_space_gib: 1" in f.cause
    assert f.fix == f"set max_model_len: {largest} or less, or raise kv_cache_space_gib to {needed_gib}"


def test_kv_cache_size_sources_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_model(tmp_path / "m", big_llama())
    explicit = expert(folder, max_model_len=32768, engine_args={"kv_cache_memory_bytes": GiB})
    f = find(check_expert(explicit, device=cpu_host()), "kv-cache-too-small")
    assert (
        "(engine_args.kv_cache_memory_bytes)" in f.cause
        and "raise engine_args.kv_cache_memory_bytes to" in f.fix
    )

    # vLLM's CPU platform lets the inherited environment variable override the engine argument
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    findings = check_expert(explicit, device=cpu_host())
    assert "kv-cache-too-small" not in codes(findings)
    assert "VLLM_CPU_KVCACHE_SPACE=8" in find(findings, "memory-summary").cause


def test_context_longer_than_the_model(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")  # max_position_embeddings 2048
    f = find(check_expert(expert(folder, max_model_len=65536), device=cpu_host()), "max-len-model")
    assert "max_model_len 65536 is longer than this model supports" in f.cause
    assert f.fix == "set max_model_len: 2048 or less"


def test_weights_larger_than_the_machine(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", big_llama(), weights=False)
    write_sparse_weights(folder, 30 * GiB, shards=3)
    f = find(check_expert(expert(folder, max_model_len=4096), device=cpu_host(24)), "weights-too-big")
    assert "weights (30.0 GiB)" in f.cause and f.fix.startswith("use a quantized checkpoint (AWQ/GPTQ)")


def test_gpu_share_too_small_for_the_weights(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    write_sparse_weights(folder, 10 * GiB)
    cfg = expert(folder, max_model_len=2048, gpu_memory_utilization=0.1)
    f = find(check_expert(cfg, device=gpu_host(80)), "kv-cache-none")
    assert "gpu_memory_utilization 0.1 x 80.0 GiB" in f.cause
    # 10 GiB of weights + ~2 GiB runtime + the KV cache of one 2048-token sequence, out of 80 GiB
    assert f.fix == "raise gpu_memory_utilization to 0.16 (enough for max_model_len 2048)"


def test_kv_cache_larger_than_the_machine_and_than_what_is_free(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    f = find(
        check_expert(expert(folder, max_model_len=1024, kv_cache_space_gib=30), device=cpu_host(24)),
        "memory-exceeds-device",
    )
    assert "lower kv_cache_space_gib" in f.fix
    f = find(
        check_expert(expert(folder, max_model_len=1024, kv_cache_space_gib=8), device=cpu_host(24, 6)),
        "memory-exceeds-available",
    )
    assert f.severity == "warning" and "free memory before starting this expert" in f.fix


def test_eager_experts_together_exceed_the_machine(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", weights=False)
    write_sparse_weights(folder, 4 * GiB)
    mesh = MeshConfig(
        experts=[
            expert(folder, expert_id="a", max_model_len=2048, kv_cache_space_gib=7),
            expert(folder, expert_id="b", domain="code", max_model_len=2048, kv_cache_space_gib=7),
            expert(
                folder, expert_id="c", domain="math", max_model_len=2048, kv_cache_space_gib=7, load="lazy"
            ),
        ]
    )
    results = check_mesh(mesh, device=cpu_host(24))
    assert not any(codes(results[e], "error") for e in "abc")  # each one alone fits
    f = find(results[MESH_KEY], "mesh-memory")
    assert "a 13.0 GiB, b 13.0 GiB" in f.cause
    assert (
        f.fix
        == "set kv_cache_space_gib per eager expert (e.g. a: 1, b: 1), or set load: lazy on some of them"
    )

    two = MeshConfig(experts=[mesh.experts[0], mesh.experts[2]])
    f = find(check_mesh(two, device=cpu_host(24))[MESH_KEY], "mesh-lazy-memory")
    assert "lazy expert c (13.0 GiB)" in f.cause


# --- 6. CPU backend limits --------------------------------------------------------------------------------


def test_head_size_the_cpu_kernels_refuse(tmp_path: Path) -> None:
    config = llama_config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    folder = write_model(tmp_path / "m", config)
    f = find(
        check_expert(expert(folder, max_model_len=1024, kv_cache_space_gib=1), device=cpu_host()),
        "cpu-head-size",
    )
    assert "head size 16 is not one vLLM's CPU attention kernels support (32, 64," in f.cause
    assert f.fix.startswith("run this expert on a GPU host")
    assert "cpu-head-size" not in codes(check_expert(expert(folder, max_model_len=1024), device=gpu_host()))


def test_fp8_kv_cache_and_block_size_on_cpu(tmp_path: Path) -> None:
    config = llama_config(hidden_size=160, num_attention_heads=2, num_key_value_heads=2, head_dim=80)
    folder = write_model(tmp_path / "m", config)
    cfg = expert(
        folder,
        max_model_len=1024,
        kv_cache_space_gib=1,
        engine_args={"kv_cache_dtype": "fp8", "block_size": 16},
    )
    findings = check_expert(cfg, device=cpu_host())
    f = find(findings, "cpu-fp8-kv")
    assert "head size divisible by 32; this model's is 80" in f.cause
    assert find(findings, "cpu-block-size").severity == "warning"


# --- the production config, against folders shaped like its five models ----------------------------------


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> MeshConfig:
    root = tmp_path_factory.mktemp("models")
    folders = write_production_models(root)
    data = json.loads((REPO / "configs" / "production.json").read_text())
    for e in data["experts"]:
        e["model_path"] = str(folders[e["model_path"]])
    return parse_config(json.dumps(data), root / "production.json")


def test_production_on_a_gpu_host(production: MeshConfig) -> None:
    results = check_mesh(production, device=gpu_host(80))
    for e in production.experts:
        assert not codes(results[e.expert_id], "error") | codes(results[e.expert_id], "warning"), e.expert_id
    gemma = find(results["gemma3_multimodal"], "memory-summary").cause
    assert "weights 51.1 GiB" in gemma
    assert "(10 full-attention, 52 sliding-window layers of 1024 tokens)" in gemma
    aya = find(results["aya_expanse_multilingual"], "dtype-cast")
    assert aya.cause.startswith("weights stored in float16 run as bfloat16")
    # both eager experts claim 0.92 of the GPU each: the second would not start
    f = find(results[MESH_KEY], "mesh-memory")
    assert "phi4_fast 73.6 GiB, qwen_coder 73.6 GiB" in f.cause
    assert f.fix.startswith("set gpu_memory_utilization per eager expert (at least phi4_fast: 0.")


def test_production_on_a_cpu_host(production: MeshConfig) -> None:
    results = check_mesh(production, device=cpu_host(24))
    assert codes(results["gemma3_multimodal"], "error") == {"weights-too-big"}
    assert "weights (51.1 GiB)" in find(results["gemma3_multimodal"], "weights-too-big").cause
    for expert_id in ("phi4_fast", "mistral_balanced", "qwen_coder", "aya_expanse_multilingual"):
        assert not codes(results[expert_id], "error"), results[expert_id]  # AWQ runs on CPU; head sizes 128
    f = find(results[MESH_KEY], "mesh-memory")
    assert "size themselves as a share of the whole CPU" in f.cause
    assert (
        f.fix == "set kv_cache_space_gib per eager expert (e.g. phi4_fast: 3, qwen_coder: 1), "
        "or set load: lazy on some of them"
    )


def test_gemma3_at_65536_reports_the_length_that_fits(production: MeshConfig) -> None:
    """The original failure: 65 536 did not fit; 24 576 was found by trial. Now it is read off the config."""
    per_layer_token = 2 * 16 * 128 * 2  # K and V x 16 KV heads x head_dim 128 x bfloat16
    sliding_blocks = math.ceil((1024 - 1 + 2048) / 16) + 1  # window + one batch in flight, 16-token blocks

    def needed(length: int) -> int:  # 10 full-attention layers, 52 sliding-window layers, 62 reserved blocks
        return (10 * math.ceil(length / 16) + 52 * sliding_blocks + 62) * 16 * per_layer_token

    budget = needed(24576) + 5 * 16 * per_layer_token  # half a step short of 24 592
    gemma = production.expert("gemma3_multimodal").model_copy(
        update={"max_model_len": 65536, "engine_args": {"kv_cache_memory_bytes": budget}}
    )
    f = find(check_expert(gemma, production, device=gpu_host(80)), "kv-cache-too-small")
    assert "one sequence of max_model_len 65536 needs" in f.cause
    assert (
        f.fix
        == f"set max_model_len: 24576 or less, or raise engine_args.kv_cache_memory_bytes to {needed(65536)}"
    )


@pytest.mark.usefixtures("awq_float16_only")
def test_production_mistral_awq_in_bfloat16(production: MeshConfig) -> None:
    mistral = production.expert("mistral_balanced").model_copy(update={"dtype": "bfloat16"})
    f = find(check_expert(mistral, device=gpu_host(80)), "quant-dtype")
    assert f.fix == "set dtype: float16 for this expert (awq kernels run in float16)"
    assert "quant-dtype" not in codes(
        check_expert(production.expert("mistral_balanced"), device=gpu_host(80))
    )


# --- output: table, JSON, exit code -------------------------------------------------------------------------


def mesh_file(tmp_path: Path, good: Path, bad: Path | None = None) -> Path:
    lines = [
        "experts:",
        f"  - {{expert_id: good, domain: general, model_path: {good}, dtype: bfloat16,",
        "      max_model_len: 1024, kv_cache_space_gib: 1}",
    ]
    if bad is not None:
        lines.append(f"  - {{expert_id: bad, domain: code, model_path: {bad}, max_model_len: 1024}}")
    return write_yaml(tmp_path / "mesh.yaml", "\n".join(lines) + "\n")


def test_main_check_exit_code_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_model(tmp_path / "good")
    ok_cfg = mesh_file(tmp_path, good)
    assert main_check(str(ok_cfg), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["errors"] == 0
    assert report["config"] == {"path": str(ok_cfg), "reason": "--config"}
    assert report["device"]["kind"] == ("gpu" if torch.cuda.is_available() else "cpu")
    assert "memory-summary" in {f["code"] for f in report["results"]["good"]}

    bad_cfg = mesh_file(tmp_path, good, tmp_path / "absent")
    assert main_check(str(bad_cfg), as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["errors"] == 1
    assert report["results"]["bad"][0]["code"] == "model-missing"
    assert set(report["results"]) == {CONFIG_KEY, "good", "bad", MESH_KEY}


def test_cli_check_dispatch_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from expertmesh.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    cfg = mesh_file(tmp_path, write_model(tmp_path / "good"), tmp_path / "absent")
    assert main(["check", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert f"config: {cfg} (from --config)" in out
    assert "bad — " in out and "FAILED" in out and "model-missing" in out and "good — " in out
    assert "1 error(s), 0 warning(s)" in out

    assert main(["check", "--config", str(tmp_path / "nope.yaml"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [f["code"] for f in report["results"][CONFIG_KEY]] == ["config-missing", "config-source"]


def test_render_findings_shows_cause_and_fix() -> None:
    out = io.StringIO()
    results = {
        "e1": [Finding("error", "quant-dtype", "bf16 but awq runs in fp16", "set dtype: float16")],
        MESH_KEY: [],
    }
    render_findings(results, Console(file=out, width=160))
    text = out.getvalue()
    assert "e1: FAILED (1 error(s), 0 warning(s))" in text
    assert "quant-dtype" in text and "set dtype: float16" in text
    assert str(results["e1"][0]) == "bf16 but awq runs in fp16 — set dtype: float16"


# --- probe: one real engine --------------------------------------------------------------------------------


@pytest.mark.engine
def test_probe_times_a_real_expert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from expertmesh.demo_models import DEFAULT_MODELS_DIR, ensure_demo_models
    from expertmesh.probe import main_probe

    ensure_demo_models(DEFAULT_MODELS_DIR, log=False)
    monkeypatch.setenv("COLUMNS", "200")
    cfg = write_yaml(
        tmp_path / "probe.yaml",
        f"gateway: {{host: 127.0.0.1, port: {free_port()}}}\n"
        "grace_period_s: 5\nmax_restarts: 0\n"
        "experts:\n"
        "  - expert_id: general_tiny\n    domain: general\n"
        f"    model_path: {DEFAULT_MODELS_DIR / 'demo-general'}\n"
        f"    port: {free_port()}\n    dtype: bfloat16\n    max_model_len: 1024\n    kv_cache_space_gib: 1\n"
        "    enforce_eager: true\n",
    )
    assert main_probe(str(cfg), requests=2) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "general_tiny" in line)
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    expert_id, load, ready, first_ttft, p50, worst, rate, tokens, status = cells
    assert (expert_id, load, tokens, status) == ("general_tiny", "eager", "32", "ok")
    assert float(ready) > 1.0  # an engine start, not a stub
    assert float(first_ttft) > 0 and 0 < int(p50) <= int(worst) and float(rate) > 0
