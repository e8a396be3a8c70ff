"""``python -m expertmesh.services.expert --expert-id ID [--config FILE] [--port N] [--replica R]``."""

from __future__ import annotations

import argparse
import gc
import sys

from expertmesh import loop
from expertmesh.config import ConfigError, load_resolved
from expertmesh.logs import setup_logging

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
    setup_logging()
    try:
        config, source = load_resolved(args.config)
        index = [e.expert_id for e in config.experts].index(args.expert_id)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError:
        print(f"error: expert {args.expert_id!r} is not in {source.path}", file=sys.stderr)
        return 2
    ports = config.replica_ports(index)
    if not 0 <= args.replica < len(ports):
        print(f"error: expert {args.expert_id!r} has {len(ports)} local replicas", file=sys.stderr)
        return 2
    port = ports[args.replica] if args.port is None else args.port
    expert = config.experts[index]
    if args.replica and expert.metrics_port is not None:
        expert = expert.model_copy(update={"metrics_port": expert.metrics_port + args.replica})
    code = loop.run(serve(expert, port, config.grace_period_s, config))
    # torch and vLLM leave millions of objects; collecting them at exit takes seconds of the
    # grace period for nothing. Frozen objects are skipped by the final collections.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
