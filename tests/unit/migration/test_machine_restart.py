"""Restart of the migration machine from its persisted snapshot, phase by phase."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from migration_machine_driver import DST, SRC, Driver

from edgevisor.migration.commands import (
    AbortRequested,
    Cause,
    Command,
    DiscardTarget,
    HostDown,
    HostUp,
    Mode,
    MoveRecord,
    PersistPhase,
    Phase,
    PrepareTarget,
    Progress,
    ReleaseSource,
    ResumeOnSource,
    ResyncSource,
    SetRoles,
    StartFill,
    StopTarget,
    Verify,
)
from edgevisor.migration.machine import UNREACHABLE, Migration

P = PersistPhase


def restart(d: Driver) -> Driver:
    """What a controller restart sees: the last snapshot, through JSON."""
    snapshot = json.loads(json.dumps(d.m.to_dict()))
    m = Migration.from_dict(snapshot)
    assert m.to_dict() == snapshot
    fresh = Driver(m)
    fresh.now = d.now + 60.0
    return fresh


def in_requested(d: Driver) -> None:
    pass


def in_preparing(d: Driver) -> None:
    d.start()


def in_switching_quiescing(d: Driver) -> None:
    """QuiesceSource and SetRoles issued (one step)."""
    d.start()
    d.done("PrepareTarget")


def in_switching_quiesced(d: Driver) -> None:
    """The source stopped; SetRoles still in flight."""
    in_switching_quiescing(d)
    d.done("QuiesceSource")


def in_switching_starting(d: Driver) -> None:
    """MoveRecord and StartOnTarget issued (one step); the move done."""
    in_switching_quiesced(d)
    d.done("SetRoles")
    d.done("MoveRecord")


def in_post_sync(d: Driver) -> None:
    in_switching_starting(d)
    d.done("StartOnTarget")


def in_post_sync_link_cut(d: Driver) -> None:
    in_post_sync(d)
    d.fail("StartFill", UNREACHABLE)  # the retry timer is lost with the restart


def in_post_sync_source_down(d: Driver) -> None:
    in_post_sync(d)
    d.send(HostDown(SRC))


def in_verifying(d: Driver) -> None:
    in_post_sync(d)
    d.done("StartFill")


def in_committed(d: Driver) -> None:
    in_verifying(d)
    d.done("Verify")


def in_committed_released(d: Driver) -> None:
    in_committed(d)
    d.done("ReleaseSource")


def in_aborting(d: Driver) -> None:
    in_post_sync(d)
    d.send(AbortRequested())
    d.done("StopTarget")
    d.done("ResyncSource")


def in_aborted(d: Driver) -> None:
    in_preparing(d)
    d.send(AbortRequested())
    d.done("PrepareTarget")
    d.done("DiscardTarget")


UNDO_ALL: list[Command] = [
    StopTarget(),
    ResyncSource(),
    SetRoles(primary=SRC, secondary=DST),
    MoveRecord(to_host=SRC),
    ResumeOnSource(),
    DiscardTarget(),
]

UNDO_BEFORE_START: list[Command] = [UNDO_ALL[2], *UNDO_ALL[4:]]

CASES: list[tuple[Callable[[Driver], None], Phase, list[Command], Phase | None]] = [
    # (bring there, phase persisted, commands after resume (persist stripped), final)
    (in_requested, Phase.REQUESTED, [PrepareTarget(lazy=True)], None),
    (in_preparing, Phase.PREPARING, [DiscardTarget()], Phase.FAILED_BACK),
    # nothing started on the target and no record moved yet: roles back, resume, discard
    (in_switching_quiescing, Phase.SWITCHING, UNDO_BEFORE_START, Phase.FAILED_BACK),
    (in_switching_quiesced, Phase.SWITCHING, UNDO_BEFORE_START, Phase.FAILED_BACK),
    (in_switching_starting, Phase.SWITCHING, UNDO_ALL, Phase.FAILED_BACK),
    (in_post_sync, Phase.POST_SYNC, [StartFill(rate_bytes_s=None)], None),
    (in_post_sync_link_cut, Phase.POST_SYNC, [ResyncSource()], None),
    (in_post_sync_source_down, Phase.POST_SYNC, [], None),
    (in_verifying, Phase.VERIFYING, [Verify()], None),
    (in_committed, Phase.COMMITTED, [ReleaseSource()], None),
    (in_committed_released, Phase.COMMITTED, [], None),
    (in_aborting, Phase.ABORTING, UNDO_ALL[2:], Phase.ABORTED),
    (in_aborted, Phase.ABORTED, [], None),
]


@pytest.mark.parametrize(
    ("bring", "phase", "expected", "final"), CASES, ids=[c[0].__name__ for c in CASES]
)
def test_resume_after_restart(
    bring: Callable[[Driver], None],
    phase: Phase,
    expected: list[Command],
    final: Phase | None,
) -> None:
    d = Driver()
    bring(d)
    assert d.m.phase is phase
    r = restart(d)
    out = r.m.resume(r.now)
    cmds = [c for c in out if not isinstance(c, PersistPhase)]
    if final is None:
        assert cmds == expected[:1]
        if cmds:
            # Write-ahead: the snapshot goes first.
            assert isinstance(out[0], PersistPhase)
        return
    # A rollback: answer each undo in turn and check the whole sequence.
    seen: list[Command] = []
    while cmds:
        assert isinstance(out[0], PersistPhase) and out[0].phase is Phase.ABORTING
        assert len(cmds) == 1
        seen.append(cmds[0])
        out = r.done(cmds[0].kind)
        cmds = [c for c in out if not isinstance(c, PersistPhase)]
    assert seen == expected
    assert out == [P(final)]
    assert r.m.settled
    assert r.m.cause is (Cause.ABORT if final is Phase.ABORTED else Cause.RESTART)


def test_restart_keeps_progress_and_downtime() -> None:
    d = Driver()
    in_post_sync(d)
    downtime = d.m.downtime_s
    assert downtime is not None
    r = restart(d)
    assert r.m.downtime_s == downtime
    assert r.m.status().phase is Phase.POST_SYNC


def test_restart_in_stop_and_copy_switching_rolls_back() -> None:
    d = Driver(mode=Mode.STOP_AND_COPY)
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")  # the copy is running
    r = restart(d)
    assert r.m.resume(r.now) == [P(Phase.ABORTING), ResumeOnSource()]


def test_unknown_snapshot_version_is_refused() -> None:
    d = Driver()
    snap = d.m.to_dict()
    snap["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Migration.from_dict(snap)


def test_answers_to_commands_issued_before_the_restart_are_stale() -> None:
    d = Driver()
    in_post_sync(d)
    old_fill = d.pending("StartFill")
    r = restart(d)
    r.m.resume(r.now)
    new_fill = r.pending("StartFill")
    assert new_fill.seq != old_fill.seq
    from edgevisor.migration.commands import Done

    assert r.send(Done(old_fill)) == []
    assert r.pending_kinds() == ["StartFill"]


def test_restart_while_source_down_waits_for_it_then_resyncs() -> None:
    d = Driver()
    in_post_sync_source_down(d)
    r = restart(d)
    assert r.m.resume(r.now) == []
    assert r.m.status().blocked_on == SRC
    assert r.send(HostUp(SRC)) == [P(Phase.POST_SYNC), ResyncSource()]


def test_restart_does_not_move_progress_backwards() -> None:
    d = Driver(volume_bytes=1000)
    in_post_sync(d)
    d.send(Progress(700, 1000))
    d.send(Progress(600, 1000))
    r = restart(d)
    assert r.m.status().present_bytes == 700
