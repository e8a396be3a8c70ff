"""Logging set-up shared by every expertmesh process."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    """Log to stderr with the process role in each line; level from EXPERTMESH_LOG_LEVEL."""
    logging.basicConfig(
        level=(level or os.environ.get("EXPERTMESH_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
