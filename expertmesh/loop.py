"""The event loop the serving processes run on."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on uvloop.

    The gateway and the experts spend most of their CPU on per-message gRPC work, taken from the
    engine on a small host; uvloop (as vLLM's own servers use) makes that work cheaper.
    """
    return uvloop.run(main)
