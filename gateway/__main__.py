"""``python -m expertmesh.gateway [--config FILE] [--port N]``."""

from __future__ import annotations

import argparse
import sys

from expertmesh import loop
from expertmesh.config import ConfigError, load_resolved
from expertmesh.logs import setup_logging
from expertmesh.tls import TlsError

from .auth import TokensError
from .server import serve


def main(argv: list[str] | None = None) -> int:
    """Start the gateway from the mesh config."""
    parser = argparse.ArgumentParser(prog="expertmesh-gateway", description=__doc__)
    parser.add_argument("--config", help="mesh config (env: EXPERTMESH_CONFIG, legacy VLLM_CONFIG_PATH)")
    parser.add_argument("--port", type=int, help="listen port (default: gateway.port from the config)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        config, source = load_resolved(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return loop.run(serve(config, source.path, args.port))
    except (TokensError, TlsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
