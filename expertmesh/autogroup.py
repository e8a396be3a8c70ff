"""Give the mesh's scheduling group less weight than programs in other sessions (``up``).

With the kernel's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on in
most desktop and many server kernels) every session is a scheduling group, and the CPU is
shared between groups first. ``up`` keeps its children in its own session (one group: an
expert in a group of its own was starved by its engine), but a client started from another
terminal is in another group, and on a small host it was measured starved by the mesh's
spinning engine processes for 1-2 s at a time: runnable, without a CPU, its streams arriving
whole at their end. A positive nice on the mesh's group (``/proc/self/autogroup``) lets such a
client run as soon as it is runnable; it costs the mesh only the CPU those programs use.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: This process's autogroup: reading it gives ``/autogroup-N nice K``; writing a number sets K.
AUTOGROUP = Path("/proc/self/autogroup")
ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def current_nice(path: Path = AUTOGROUP) -> int | None:
    """The nice value of this session's scheduling group; None without autogroup."""
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def lower_session_weight(nice: int | None, path: Path = AUTOGROUP, enabled: Path = ENABLED) -> str:
    """Set this session's scheduling group to ``nice`` (None: leave it); say what was done.

    Only ever raised: a lower value needs CAP_SYS_NICE, and a group already nicer (an operator's
    choice) is kept. Without autogroup (disabled, or no /proc) nothing changes.
    """
    if nice is None:
        return "autogroup nice left as it is (session_nice: null)"
    try:
        if enabled.read_text().strip() != "1":
            return "autogroup scheduling is off: nothing to do"
    except OSError:
        return "no autogroup scheduling here: nothing to do"
    before = current_nice(path)
    if before is None:
        return "no autogroup scheduling here: nothing to do"
    if before >= nice:
        return f"this session's scheduling group keeps nice {before}"
    try:
        path.write_text(str(nice))
    except OSError as e:
        log.warning("could not set this session's autogroup nice to %d: %s", nice, e)
        return f"this session's scheduling group keeps nice {before} ({e})"
    return f"this session's scheduling group: nice {before} -> {nice} (programs in other sessions go first)"
