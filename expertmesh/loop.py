"""The event loop the serving processes run on, and how they keep their heap out of its way."""

from __future__ import annotations

import gc
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


def freeze_heap() -> None:
    """Collect, then exempt everything alive now from later collections (``gc.freeze()``).

    torch and vLLM leave ~700 000 objects in an expert (~190 000 in a gateway with the
    embeddings classifier). Every full collection walked them all with every stream stopped:
    0.5-0.6 s in an expert at 128 streams, every 10-20 s; frozen, a full collection takes 5-10
    ms. vLLM's own servers freeze their heap after start-up too. ``gc.unfreeze()`` undoes it.
    """
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    """Undo :func:`freeze_heap`, so that what was frozen can be collected again (an engine was
    replaced; or a server ran inside a larger process, e.g. a test, and leaves its heap as found)."""
    gc.unfreeze()


def skip_exit_collection() -> None:
    """Freeze the heap just before the process exits: torch and vLLM leave millions of objects,
    and collecting them at exit takes seconds of the grace period for nothing (frozen objects are
    skipped by the final collections)."""
    gc.freeze()
