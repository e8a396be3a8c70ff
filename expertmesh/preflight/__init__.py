"""Preflight: read the mesh config and model folders and report every problem before loading.

``expertmesh check`` (:func:`main_check`) and ``expertmesh up`` use the same checks:
:func:`check_expert` for one expert, :func:`check_mesh` for all of them and the mesh as a whole,
:func:`render_findings` / :func:`findings_table` to show the result in a terminal.
"""

from expertmesh.preflight.check import check_expert, check_mesh, main_check
from expertmesh.preflight.device import DeviceFacts, detect_device
from expertmesh.preflight.findings import CONFIG_KEY, MESH_KEY, Finding, has_errors
from expertmesh.preflight.report import findings_table, render_findings, results_to_json

__all__ = [
    "CONFIG_KEY",
    "MESH_KEY",
    "DeviceFacts",
    "Finding",
    "check_expert",
    "check_mesh",
    "detect_device",
    "findings_table",
    "has_errors",
    "main_check",
    "render_findings",
    "results_to_json",
]
