"""The mesh configuration: one file, modelled once, used by every process. The model is in
sections (:mod:`expertmesh.expert_config`, :mod:`expertmesh.routing_config`,
:mod:`expertmesh.mesh_config`, :mod:`expertmesh.security_config`); this module loads it, and
every part is imported from here.

The file is YAML or JSON. It accepts the original system's JSON shape unchanged
(``{"experts": [{"expert_id", "model_path", "domain", "quantization", "dtype",
"max_model_len", ...}]}``) and adds mesh-level settings with defaults.

Which file is used is decided by :func:`resolve_config_path`; the choice and its reason
are always reported, and a missing file is an error, never a silent fallback.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from expertmesh.expert_config import ExpertConfig
from expertmesh.mesh_config import TOKENS_FILE_ENV, GatewayConfig, LimitsConfig, MeshConfig
from expertmesh.routing_config import DomainRules, RoutingConfig
from expertmesh.security_config import AuthConfig, CertPair, InternalTlsConfig, TenantConfig, TlsConfig

#: The one config model, in sections: this module loads it and is where every part is imported from.
__all__ = [
    "CONFIG_ENV_VARS",
    "DEFAULT_CONFIG",
    "TOKENS_FILE_ENV",
    "AuthConfig",
    "CertPair",
    "ConfigError",
    "ConfigSource",
    "DomainRules",
    "ExpertConfig",
    "GatewayConfig",
    "InternalTlsConfig",
    "LimitsConfig",
    "MeshConfig",
    "RoutingConfig",
    "TenantConfig",
    "TlsConfig",
    "load_config",
    "load_resolved",
    "parse_config",
    "resolve_config_path",
]

#: Environment variables that name the config file, highest precedence first.
CONFIG_ENV_VARS = ("EXPERTMESH_CONFIG", "VLLM_CONFIG_PATH")
#: The config used when neither the flag nor an environment variable names one.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


class ConfigError(Exception):
    """The mesh config cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ConfigSource:
    """Which file was chosen and why (``--config``, an environment variable, or the default)."""

    path: Path
    reason: str

    def describe(self) -> str:
        """One line for logs: ``config: /path (from --config)``."""
        return f"config: {self.path} (from {self.reason})"


def resolve_config_path(
    flag: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> ConfigSource:
    """Pick the config file: ``--config`` > EXPERTMESH_CONFIG > VLLM_CONFIG_PATH > default."""
    env = os.environ if environ is None else environ
    if flag:
        return ConfigSource(Path(flag), "--config")
    for name in CONFIG_ENV_VARS:
        if env.get(name):
            return ConfigSource(Path(env[name]), name)
    return ConfigSource(DEFAULT_CONFIG, "default")


def _closest(key: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


_SECTIONS: dict[str, type[BaseModel]] = {
    "gateway": GatewayConfig,
    "routing": RoutingConfig,
    "limits": LimitsConfig,
    "internal_tls": InternalTlsConfig,
    "auth": AuthConfig,
}
_SUBSECTIONS: dict[str, type[BaseModel]] = {"domains": DomainRules, "tenants": TenantConfig}
#: Sections one level down that are a model of their own (``gateway.tls.x``).
_NESTED: dict[tuple[str, str], type[BaseModel]] = {
    ("gateway", "tls"): TlsConfig,
    ("gateway", "internal_cert"): CertPair,
    ("experts", "internal_cert"): CertPair,
}


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            model: type[BaseModel] = MeshConfig
            nested = (str(e["loc"][0]), str(e["loc"][-2])) if len(e["loc"]) > 2 else None
            if nested in _NESTED:
                model = _NESTED[nested]
            elif len(e["loc"]) > 1 and e["loc"][0] == "experts":
                model = ExpertConfig
            elif len(e["loc"]) > 3 and e["loc"][1] in _SUBSECTIONS:
                model = _SUBSECTIONS[str(e["loc"][1])]
            elif len(e["loc"]) > 1 and e["loc"][0] in _SECTIONS:
                model = _SECTIONS[str(e["loc"][0])]
            lines.append(f"  unknown key {loc!r}{_closest(key, list(model.model_fields))}")
        elif e["type"] == "value_error":
            for line in e["msg"].removeprefix("Value error, ").splitlines():
                lines.append(f"  {loc or '(top level)'}: {line}")
        else:
            lines.append(f"  {loc or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def parse_config(text: str, path: Path) -> MeshConfig:
    """Parse and validate config text; ``path`` names the file in errors and anchors relative paths."""
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON in {path} at line {e.lineno} column {e.colno}: {e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping with an 'experts' list")
    try:
        config = MeshConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(path, e)) from e
    return _anchor_paths(config, path.resolve().parent)


def _anchor_paths(config: MeshConfig, base: Path) -> MeshConfig:
    """Resolve relative model paths against the config file's folder, not the cwd.

    A relative value that is neither ``./``-style nor an existing folder there is kept as
    given, so hub ids (``org/name``) still reach vLLM on hosts that can download.
    """
    experts = []
    for e in config.experts:
        given = Path(e.model_path).expanduser()
        anchored = given if given.is_absolute() else base / given
        if given.is_absolute() or e.model_path.startswith((".", "~")) or anchored.exists():
            e = e.model_copy(update={"model_path": str(anchored.resolve())})
        experts.append(e)
    return _anchor_security(config.model_copy(update={"experts": experts}), base)


def _anchor_security(config: MeshConfig, base: Path) -> MeshConfig:
    """Certificate, key and tokens paths relative to the config file's folder, as model paths are."""

    def fix(model: Any) -> Any:
        if model is None:
            return None
        update = {}
        for name in ("cert_file", "key_file", "ca_file", "client_ca_file", "tokens_file"):
            value = getattr(model, name, None)
            if value:
                update[name] = str((base / Path(value).expanduser()).resolve())
        return model.model_copy(update=update)

    gateway = config.gateway.model_copy(
        update={"tls": fix(config.gateway.tls), "internal_cert": fix(config.gateway.internal_cert)}
    )
    experts = [e.model_copy(update={"internal_cert": fix(e.internal_cert)}) for e in config.experts]
    return config.model_copy(
        update={
            "gateway": gateway,
            "experts": experts,
            "internal_tls": fix(config.internal_tls),
            "auth": fix(config.auth),
        }
    )


def load_config(source: ConfigSource | str | os.PathLike[str]) -> MeshConfig:
    """Read and validate a mesh config file; raises :class:`ConfigError` naming the file."""
    path = source.path if isinstance(source, ConfigSource) else Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    return parse_config(text, path)


def load_resolved(flag: str | os.PathLike[str] | None = None) -> tuple[MeshConfig, ConfigSource]:
    """Resolve the config path by precedence, load it, and say on stderr which file is used."""
    source = resolve_config_path(flag)
    config = load_config(source)
    print(source.describe(), file=sys.stderr, flush=True)
    return config, source
