"""Config-level findings: which file is used and why, and what ``load_config`` found wrong with it.

The validation itself lives in :mod:`expertmesh.config` (one config model for every process);
this module only turns its :class:`ConfigError` into findings, each with a fix.
"""

from __future__ import annotations

import re

from expertmesh.config import ConfigError, ConfigSource, MeshConfig, load_config, resolve_config_path
from expertmesh.preflight.findings import Finding, error, info

_WHERE = re.compile(r"at line (\d+) column (\d+)")
_UNKNOWN_KEY = re.compile(r"unknown key '([^']+)'(?: \(did you mean '([^']+)'\?\))?")


def _missing_fix(source: ConfigSource) -> str:
    if source.reason == "--config":
        return "check the path given to --config"
    if source.reason == "default":
        return "create it, or name a config with --config FILE or EXPERTMESH_CONFIG"
    return f"{source.reason} names a file that does not exist: point it at the config, or unset it"


#: ``load_config`` messages about the mesh as a whole -> (code, fix).
_CONSISTENCY = (
    ("duplicate expert_id", "config-duplicate-id", "give every expert a unique expert_id"),
    (
        "duplicate expert port",
        "config-duplicate-port",
        "give each expert its own port, or remove port: to use expert_base_port + the expert's index",
    ),
    (
        "is also the gateway port",
        "config-port-gateway",
        "give the expert another port (or move the gateway: gateway.port)",
    ),
    ("default_domain", "config-default-domain", "set default_domain to a domain one of the experts serves"),
    (
        "routing.fallbacks names domain",
        "config-fallback-domain",
        "remove that domain from routing.fallbacks, or add an expert that serves it",
    ),
    (
        "routing.fallbacks[",
        "config-fallback-unknown",
        "name only domains or expert_ids of this mesh in the chain",
    ),
)


def _problem_finding(line: str) -> Finding:
    """One line of a validation error from ``load_config``."""
    text = line.strip()
    unknown = _UNKNOWN_KEY.search(text)
    if unknown:
        key, suggestion = unknown.groups()
        name = key.rsplit(".", 1)[-1]
        fix = f"rename {name!r} to {suggestion!r}" if suggestion else f"remove {name!r}: it is not a setting"
        return error("config-unknown-key", text, fix)
    for needle, code, fix in _CONSISTENCY:
        if needle in text:
            return error(code, text, fix)
    loc = text.split(":", 1)[0]
    return error("config-invalid", text, f"correct {loc} in the config")


def config_error_findings(err: ConfigError, source: ConfigSource) -> list[Finding]:
    """Findings for a config that ``load_config`` refused, one per problem it names."""
    message = str(err)
    first, *rest = message.splitlines()
    if first.startswith("config file not found"):
        return [error("config-missing", first, _missing_fix(source))]
    if "cannot be read" in first:
        return [error("config-unreadable", first, "make the file readable by this user")]
    if first.startswith(("invalid JSON", "invalid YAML")):
        where = _WHERE.search(first)
        place = f" at line {where.group(1)} column {where.group(2)}" if where else ""
        return [error("config-syntax", first, f"correct the syntax{place}")]
    if rest:
        return [_problem_finding(line) for line in rest if line.strip()]
    return [error("config-invalid", first, "correct the config")]


def load_for_check(flag: str | None) -> tuple[MeshConfig | None, ConfigSource, list[Finding]]:
    """Resolve and load the config; problems come back as findings, never as an exception."""
    source = resolve_config_path(flag)
    findings = [info("config-source", source.describe())]
    try:
        config = load_config(source)
    except ConfigError as e:
        return None, source, [*findings, *config_error_findings(e, source)]
    return config, source, findings
