"""``python -m expertmesh.services.expert --expert-id ID [--config FILE] [--port N] [--replica R]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine
from typing import Any

from expertmesh.config import load_resolved
from expertmesh.runtime import Refused, entry

from .server import serve


def main(argv: list[str] | None = None) -> int:
    """Start one expert process from the mesh config."""
    parser = argparse.ArgumentParser(prog="expertmesh-expert", description=__doc__)
    parser.add_argument("--config", help="mesh config (env: EXPERTMESH_CONFIG, legacy VLLM_CONFIG_PATH)")
    parser.add_argument("--expert-id", required=True, help="which expert of the config to serve")
    parser.add_argument("--port", type=int, help="listen port (default: from the config)")
    parser.add_argument(
        "--replica", type=int, default=0, help="which of the expert's local_replicas (its port, metrics port)"
    )
    args = parser.parse_args(argv)

    def start() -> Coroutine[Any, Any, int]:
        config, source = load_resolved(args.config)
        ids = [e.expert_id for e in config.experts]
        if args.expert_id not in ids:
            raise Refused(f"expert {args.expert_id!r} is not in {source.path}")
        index = ids.index(args.expert_id)
        ports = config.replica_ports(index)
        if not 0 <= args.replica < len(ports):
            raise Refused(f"expert {args.expert_id!r} has {len(ports)} local replicas")
        port = ports[args.replica] if args.port is None else args.port
        expert = config.experts[index]
        if args.replica and expert.metrics_port is not None:
            expert = expert.model_copy(update={"metrics_port": expert.metrics_port + args.replica})
        return serve(expert, port, config.grace_period_s, config)

    return entry(start)


if __name__ == "__main__":
    sys.exit(main())
