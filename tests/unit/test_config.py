"""The mesh config: precedence, precise errors, the original system's JSON shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertmesh.config import DEFAULT_CONFIG, ConfigError, load_config, parse_config, resolve_config_path

ORIGINAL_SHAPE = {
    "experts": [
        {
            "expert_id": "phi4_fast",
            "model_path": "/models/phi-4-mini",
            "domain": "general",
            "quantization": None,
            "dtype": "bfloat16",
            "max_model_len": 16384,
        },
        {
            "expert_id": "mistral_balanced",
            "model_path": "/models/mistral-7b-instruct-awq",
            "domain": "balanced",
            "quantization": "awq",
            "dtype": "float16",
            "max_model_len": 32768,
        },
    ]
}


def test_precedence_flag_env_legacy_default() -> None:
    env = {"EXPERTMESH_CONFIG": "/a.yaml", "VLLM_CONFIG_PATH": "/b.json"}
    assert resolve_config_path("/flag.yaml", env).reason == "--config"
    assert resolve_config_path("/flag.yaml", env).path == Path("/flag.yaml")
    assert resolve_config_path(None, env).reason == "EXPERTMESH_CONFIG"
    legacy = resolve_config_path(None, {"VLLM_CONFIG_PATH": "/b.json"})
    assert (legacy.path, legacy.reason) == (Path("/b.json"), "VLLM_CONFIG_PATH")
    default = resolve_config_path(None, {})
    assert (default.path, default.reason) == (DEFAULT_CONFIG, "default")
    assert default.describe() == f"config: {DEFAULT_CONFIG} (from default)"


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_config(missing)


def test_original_json_shape_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(ORIGINAL_SHAPE))
    config = load_config(path)
    assert [e.expert_id for e in config.experts] == ["phi4_fast", "mistral_balanced"]
    mistral = config.expert("mistral_balanced")
    assert (mistral.quantization, mistral.dtype, mistral.max_model_len) == ("awq", "float16", 32768)
    assert mistral.model_path == "/models/mistral-7b-instruct-awq"
    assert config.effective_default_domain() == "general"
    assert config.expert_address(1) == "127.0.0.1:50052"


def test_unknown_key_is_named_with_the_closest_valid_one(tmp_path: Path) -> None:
    data = json.loads(json.dumps(ORIGINAL_SHAPE))
    data["experts"][0]["max_model_length"] = 4096
    data["gatway"] = {"port": 1}
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(data), tmp_path / "m.json")
    text = str(err.value)
    assert "unknown key 'experts.0.max_model_length' (did you mean 'max_model_len'?)" in text
    assert "unknown key 'gatway' (did you mean 'gateway'?)" in text


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yaml at line 3 column \d+"):
        parse_config("experts:\n  - expert_id: a\n    domain: : x\n", tmp_path / "bad.yaml")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid JSON in .*bad.json at line 2 column 1"):
        parse_config('{"experts": [\n}', tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["experts"].append(dict(d["experts"][0])), "duplicate expert_id: phi4_fast"),
        (lambda d: d.update(default_domain="law"), "default_domain 'law' has no expert"),
        (lambda d: d.update(routing={"fallbacks": {"general": ["nobody"]}}), "'nobody': neither a domain"),
        (lambda d: [e.update(port=6000) for e in d["experts"]], "duplicate expert port: 6000"),
        (lambda d: d["experts"][0].update(dtype="fp8"), "dtype 'fp8' is not one of"),
        (lambda d: d["experts"][0].update(stream_interval=0), "stream_interval must be 'auto' or a whole"),
        (lambda d: d["experts"][0].update(stream_interval="fast"), "tokens >= 1, got 'fast'"),
        (
            lambda d: d.update(routing={"domains": {"general": {"code": True}, "math": {"code": True}}}),
            r"code: true is set on 2 domains \(general, math\); at most one may have it",
        ),
    ],
)
def test_inconsistent_configs_are_rejected(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(json.dumps(ORIGINAL_SHAPE))
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_config(json.dumps(data), tmp_path / "m.json")


def test_relative_model_paths_are_anchored_to_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "models" / "m").mkdir(parents=True)
    text = (
        "experts:\n"
        "  - {expert_id: a, domain: d, model_path: models/m}\n"
        "  - {expert_id: b, domain: d, model_path: org/hub-id}\n"
    )
    config = parse_config(text, tmp_path / "mesh.yaml")
    assert config.experts[0].model_path == str(tmp_path / "models" / "m")
    assert config.experts[1].model_path == "org/hub-id"  # a hub id stays as given


def test_shipped_configs_are_valid() -> None:
    demo = load_config(DEFAULT_CONFIG)
    assert set(demo.domains()) >= {"general", "code"}
    assert demo.routing.fallbacks["code"] == ["general"]
    production = load_config(DEFAULT_CONFIG.parent / "production.json")
    assert [e.expert_id for e in production.experts] == [
        "phi4_fast",
        "mistral_balanced",
        "qwen_coder",
        "gemma3_multimodal",
        "aya_expanse_multilingual",
    ]


def test_every_consistency_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = json.loads(json.dumps(ORIGINAL_SHAPE))
    data["experts"].append(dict(data["experts"][0]))
    data["default_domain"] = "law"
    data["experts"][1]["port"] = 8080
    with pytest.raises(ConfigError) as err:
        parse_config(json.dumps(data), tmp_path / "m.json")
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        "  (top level): duplicate expert_id: phi4_fast",
        "  (top level): expert port 8080 is also the gateway port",
        "  (top level): default_domain 'law' has no expert (domains: general, balanced)",
    ]


def test_every_key_is_in_the_configuration_reference() -> None:
    """docs/configuration.md lists every key of the one config model (no key goes undocumented)."""
    from pydantic import BaseModel

    from expertmesh import config as cfg
    from expertmesh import security_config

    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    models = [m for m in vars(cfg).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        if m.__module__ in (cfg.__name__, security_config.__name__)
        for name in m.model_fields
        if f"`{name}`" not in text and f".{name}`" not in text
    ]
    assert not missing, f"not in docs/configuration.md: {missing}"
