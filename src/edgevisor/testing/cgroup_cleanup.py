"""Removing the agent's empty grouping cgroups after a test run, a benchmark or the demo.

An agent keeps ``edgevisor`` (task environments) and ``edgevisor-domains`` (domains) under
each cgroup v1 controller, like systemd slices, and leaves them when it stops: another
agent on the machine may be using them. Tooling that started its own agents removes
whatever of them is empty once they are gone; a group that still holds a group or a
process is someone else's and stays.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from edgevisor.migration.domain_parts import CGROUP_PARENT
from edgevisor.tasks.cgroups import CGROUP_ROOT, CONTROLLERS, PARENT

__all__ = ["GROUPS", "remove_empty_groups"]

GROUPS = (PARENT, CGROUP_PARENT)


def remove_empty_groups(root: Path = CGROUP_ROOT) -> None:
    """Remove every empty group under :data:`GROUPS`, deepest first (needs root)."""
    if os.geteuid() != 0:
        return
    for controller in CONTROLLERS:
        for group in GROUPS:
            top = root / controller / group
            # os.walk ignores directories that vanish under it (another run's cleanup).
            dirs = [Path(d) for d, _subdirs, _files in os.walk(top, topdown=False)]
            for d in dirs:
                with contextlib.suppress(OSError):  # still holds a group or a process
                    d.rmdir()
