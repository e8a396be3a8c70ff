"""``python -m expertmesh.gateway [--config FILE] [--port N]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine
from typing import Any

from expertmesh.config import load_resolved
from expertmesh.runtime import entry
from expertmesh.tls import TlsError

from .auth import TokensError
from .server import serve


def main(argv: list[str] | None = None) -> int:
    """Start the gateway from the mesh config."""
    parser = argparse.ArgumentParser(prog="expertmesh-gateway", description=__doc__)
    parser.add_argument("--config", help="mesh config (env: EXPERTMESH_CONFIG, legacy VLLM_CONFIG_PATH)")
    parser.add_argument("--port", type=int, help="listen port (default: gateway.port from the config)")
    args = parser.parse_args(argv)

    def start() -> Coroutine[Any, Any, int]:
        config, source = load_resolved(args.config)
        return serve(config, source.path, args.port)

    return entry(start, refusals=(TokensError, TlsError))


if __name__ == "__main__":
    sys.exit(main())
