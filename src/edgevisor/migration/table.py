"""The migration machine's tables, as data: forward plans, effects, rollback, faults.

Read with the theory of operation in ``edgevisor.migration.machine``. Kinds are command
class names from ``edgevisor.migration.commands``; sides are ``"source"``/``"target"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from edgevisor.migration.commands import Mode, Phase

__all__ = ["EFFECT_OF", "ON_ABORT", "ON_HOST_DOWN", "PLANS", "ROLLBACK_ORDER"]

# Forward plans: (phase, command kinds issued together). A step ends when all its
# commands are done; the next step's phase becomes the machine's phase.
PLANS: Final[Mapping[Mode, tuple[tuple[Phase, tuple[str, ...]], ...]]] = {
    Mode.POST_COPY: (
        (Phase.PREPARING, ("PrepareTarget",)),
        # Each step of the switch costs the downtime a write-ahead persist and a round
        # trip, so the switch has two. The roles switch while the source quiesces: the
        # target's copy does not exist yet (StartOnTarget creates it, as primary), and
        # the source's demotion queues behind the quiesce on that host.
        (Phase.SWITCHING, ("QuiesceSource", "SetRoles")),
        # The record moves while the target starts, after the stop on the source (the
        # move fences: the source stops translating first); moving it earlier would cut
        # clients off a domain still serving. Issued first, it is mostly done when the
        # start is.
        (Phase.SWITCHING, ("MoveRecord", "StartOnTarget")),
        (Phase.POST_SYNC, ("StartFill",)),
        (Phase.VERIFYING, ("Verify",)),
        (Phase.COMMITTED, ("ReleaseSource",)),
    ),
    Mode.STOP_AND_COPY: (
        (Phase.PREPARING, ("PrepareTarget",)),
        (Phase.SWITCHING, ("QuiesceSource",)),
        (Phase.SWITCHING, ("StartFill",)),
        (Phase.SWITCHING, ("Verify",)),
        (Phase.SWITCHING, ("SetRoles", "MoveRecord")),
        (Phase.SWITCHING, ("StartOnTarget",)),
        (Phase.COMMITTED, ("ReleaseSource",)),
    ),
}

# Effects a forward command may leave behind (added when issued).
EFFECT_OF: Final[Mapping[str, tuple[str, ...]]] = {
    "PrepareTarget": ("target_prepared",),
    "QuiesceSource": ("source_stopped",),
    "SetRoles": ("roles_switched",),
    "StartOnTarget": ("target_running", "target_dirty"),
    "MoveRecord": ("record_moved",),
}

# The rollback path: (command kind, effect it undoes, host it needs, if that host is down).
ROLLBACK_ORDER: Final[tuple[tuple[str, str, str, str], ...]] = (
    ("StopTarget", "target_running", "target", "skip"),  # a dead host runs nothing
    ("ResyncSource", "target_dirty", "target", "skip_if_source_current"),
    ("SetRoles", "roles_switched", "source", "wait"),  # the fence is applied on the source
    ("MoveRecord", "record_moved", "controller", "-"),
    ("ResumeOnSource", "source_stopped", "source", "wait"),
    ("DiscardTarget", "target_prepared", "target", "skip"),  # left to the reconciler
)

# Reaction to a host going down, by phase and side ("source"/"target").
ON_HOST_DOWN: Final[Mapping[tuple[Phase, str], str]] = {
    (Phase.PREPARING, "source"): "rollback",
    (Phase.PREPARING, "target"): "rollback",
    (Phase.SWITCHING, "source"): "rollback",
    (Phase.SWITCHING, "target"): "rollback",
    (Phase.POST_SYNC, "source"): "degrade",
    (Phase.POST_SYNC, "target"): "rollback",
    (Phase.VERIFYING, "source"): "degrade",
    (Phase.VERIFYING, "target"): "rollback",
    (Phase.COMMITTED, "source"): "wait",
    (Phase.COMMITTED, "target"): "ignore",
    (Phase.ABORTING, "source"): "wait",
    (Phase.ABORTING, "target"): "rollback",
    (Phase.ABORTED, "source"): "ignore",
    (Phase.ABORTED, "target"): "ignore",
    (Phase.FAILED_BACK, "source"): "ignore",
    (Phase.FAILED_BACK, "target"): "ignore",
    (Phase.REQUESTED, "source"): "ignore",
    (Phase.REQUESTED, "target"): "ignore",
}

ON_ABORT: Final[Mapping[Phase, str]] = {
    Phase.REQUESTED: "abort_now",
    Phase.PREPARING: "rollback",
    Phase.SWITCHING: "rollback",
    Phase.POST_SYNC: "rollback",
    Phase.VERIFYING: "rollback",
    Phase.COMMITTED: "refuse",
    Phase.ABORTING: "ignore",
    Phase.ABORTED: "ignore",
    Phase.FAILED_BACK: "ignore",
}
