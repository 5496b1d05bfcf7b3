"""Finding and removing what test topologies leave behind (namespaces, root veths,
their processes): after a crashed run, and at every topology's close."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Sequence

from edgevisor.testing.netns import (
    TopologyError,
    blocked_signals,
    link_delete,
    link_names,
    netns_delete,
    netns_list,
    netns_pids,
)

__all__ = [
    "DEFAULT_PREFIX",
    "cleanup_stale",
    "group_exists",
    "kill_netns_processes",
    "leftovers",
    "pid_alive",
]

DEFAULT_PREFIX = "evt"
# Default prefixes look like "evt<pid hex>-<3 hex>": cleanup_stale parses the owner's pid.
_OWNER_RE = re.compile(rf"^{DEFAULT_PREFIX}([0-9a-f]+)-[0-9a-f]{{3}}")


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose names start with ``prefix``."""
    found = [f"netns:{ns}" for ns in netns_list() if ns.startswith(prefix)]
    found += [f"link:{name}" for name in link_names() if name.startswith(prefix)]
    return found


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, only_dead_owners: bool = True) -> list[str]:
    """Remove namespaces and root veths left by crashed runs; return what was removed.

    With ``only_dead_owners`` (default), names in the default format (which carry the
    owner's pid) are removed only when that process is gone, so a concurrent run on the
    same machine is never touched; names in another format are skipped then. Pass
    ``only_dead_owners=False`` to remove everything under a specific prefix.
    """
    if len(prefix) < 3:
        raise TopologyError("refusing a prefix shorter than 3 characters")

    def stale(name: str) -> bool:
        if not name.startswith(prefix):
            return False
        if not only_dead_owners:
            return True
        m = _OWNER_RE.match(name)
        return m is not None and not pid_alive(int(m.group(1), 16))

    namespaces = [ns for ns in netns_list() if stale(ns)]
    links = [name for name in link_names() if stale(name)]
    with blocked_signals():
        kill_netns_processes(namespaces)
        for name in links:
            link_delete(name)
        for ns in namespaces:
            netns_delete(ns)
    return [f"netns:{ns}" for ns in namespaces] + [f"link:{name}" for name in links]


def kill_netns_processes(namespaces: Sequence[str]) -> None:
    pids = [pid for ns in namespaces for pid in netns_pids(ns) if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if pid_alive(pid)]
        if pids:
            time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes (its namespace references are gone).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
