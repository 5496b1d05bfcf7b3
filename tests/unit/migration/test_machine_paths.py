"""Exact command sequences of the migration state machine, path by path."""

from __future__ import annotations

import pytest
from migration_machine_driver import DST, SRC, Driver

from edgevisor.errors import NotFound
from edgevisor.migration.commands import (
    AbortRefused,
    AbortRequested,
    Cause,
    DiscardTarget,
    Done,
    HostDown,
    HostUp,
    MigrationRefused,
    Mode,
    MoveRecord,
    PersistPhase,
    Phase,
    PrepareTarget,
    Progress,
    QuiesceSource,
    ReleaseSource,
    ResumeOnSource,
    ResyncSource,
    SetRoles,
    StartFill,
    StartOnTarget,
    StopFill,
    StopTarget,
    Tick,
    Verify,
    Wakeup,
)
from edgevisor.migration.machine import UNREACHABLE, Migration, admit

P = PersistPhase
ROLLBACK_AFTER_START = [
    # (answer this, expect these next) once the target stopped
    ("StopTarget", [P(Phase.ABORTING), ResyncSource()]),
    ("ResyncSource", [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]),
    ("SetRoles", [P(Phase.ABORTING), MoveRecord(to_host=SRC)]),
    ("MoveRecord", [P(Phase.ABORTING), ResumeOnSource()]),
    ("ResumeOnSource", [P(Phase.ABORTING), DiscardTarget()]),
]


def to_post_sync(d: Driver) -> None:
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    d.done("MoveRecord")
    assert d.done("StartOnTarget") == [P(Phase.POST_SYNC), StartFill(rate_bytes_s=None)]


def finish_rollback(d: Driver, final: Phase) -> None:
    for kind, expected in ROLLBACK_AFTER_START:
        assert d.done(kind) == expected, kind
    assert d.done("DiscardTarget") == [P(final)]
    assert d.m.phase is final
    assert d.m.settled


# -- forward paths ---------------------------------------------------------------------


def test_happy_path_post_copy_with_address() -> None:
    d = Driver(rate_bytes_s=200_000_000)
    assert d.start() == [P(Phase.PREPARING), PrepareTarget(lazy=True)]
    # The switch is two steps: the roles switch while the source quiesces; the record
    # moves (after the stop on the source) while the target starts.
    assert d.done("PrepareTarget", dt=1.0) == [
        P(Phase.SWITCHING),
        QuiesceSource(),
        SetRoles(primary=DST, secondary=SRC),
    ]
    assert d.done("SetRoles", dt=0.005) == []  # the step waits for the quiesce
    assert d.done("QuiesceSource", dt=0.010) == [
        P(Phase.SWITCHING),
        MoveRecord(to_host=DST),
        StartOnTarget(),
    ]
    assert d.done("MoveRecord", dt=0.005) == []  # the step waits for the start
    # Downtime: from issuing QuiesceSource (t=1.0) to StartOnTarget done.
    assert d.done("StartOnTarget", dt=0.050) == [
        P(Phase.POST_SYNC),
        StartFill(rate_bytes_s=200_000_000),
    ]
    assert d.m.downtime_s == pytest.approx(0.070)
    assert d.send(Progress(1 << 19, 1 << 20)) == [P(Phase.POST_SYNC)]
    assert d.done("StartFill") == [P(Phase.VERIFYING), Verify()]
    assert d.m.status().present_bytes == 1 << 20
    assert d.done("Verify") == [P(Phase.COMMITTED), ReleaseSource()]
    assert d.m.phase is Phase.COMMITTED and not d.m.settled
    assert d.done("ReleaseSource") == [P(Phase.COMMITTED)]
    assert d.m.settled
    assert d.m.status().downtime_s == pytest.approx(0.070)


def test_failed_record_move_drains_the_start_then_rolls_back() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    assert d.fail("MoveRecord", "conflict: address changed meanwhile") == [P(Phase.ABORTING)]
    # StartOnTarget is drained; then everything that may have happened is undone, the
    # record's move too (idempotent: a record still on the source stays there).
    assert d.done("StartOnTarget") == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.FAILED_BACK)
    assert d.m.reason is not None and "MoveRecord failed" in d.m.reason


def test_stop_and_copy_without_address_moves_no_record() -> None:
    d = Driver(mode=Mode.STOP_AND_COPY, has_address=False)
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("StartFill")
    assert d.done("Verify") == [P(Phase.SWITCHING), SetRoles(primary=DST, secondary=SRC)]
    assert d.done("SetRoles") == [P(Phase.SWITCHING), StartOnTarget()]
    assert d.done("StartOnTarget") == [P(Phase.COMMITTED), ReleaseSource()]


def test_happy_path_without_address_moves_no_record() -> None:
    d = Driver(has_address=False)
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    assert d.done("SetRoles") == [P(Phase.SWITCHING), StartOnTarget()]
    assert d.done("StartOnTarget") == [P(Phase.POST_SYNC), StartFill(rate_bytes_s=None)]


def test_stop_and_copy_copies_everything_before_switching() -> None:
    d = Driver(mode=Mode.STOP_AND_COPY)
    assert d.start() == [P(Phase.PREPARING), PrepareTarget(lazy=False)]
    assert d.done("PrepareTarget", dt=1.0) == [P(Phase.SWITCHING), QuiesceSource()]
    assert d.done("QuiesceSource") == [P(Phase.SWITCHING), StartFill(rate_bytes_s=None)]
    assert d.done("StartFill", dt=10.0) == [P(Phase.SWITCHING), Verify()]
    assert d.done("Verify") == [
        P(Phase.SWITCHING),
        SetRoles(primary=DST, secondary=SRC),
        MoveRecord(to_host=DST),
    ]
    assert d.done("MoveRecord") == []
    assert d.done("SetRoles") == [P(Phase.SWITCHING), StartOnTarget()]
    assert d.done("StartOnTarget") == [P(Phase.COMMITTED), ReleaseSource()]
    # The copy happened inside the downtime: quiesce issued at t=1, started at t=16.
    assert d.m.downtime_s == pytest.approx(15.0)


# -- aborts ----------------------------------------------------------------------------


def test_abort_before_start_of_work() -> None:
    d = Driver()
    assert d.send(AbortRequested()) == [P(Phase.ABORTED)]
    assert d.m.settled and d.m.cause is Cause.ABORT
    assert d.send(AbortRequested()) == []


def test_abort_in_preparing_waits_for_the_prepare_then_discards() -> None:
    d = Driver()
    d.start()
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]
    assert d.done("PrepareTarget") == [P(Phase.ABORTING), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.ABORTED)]
    assert d.m.settled


def test_abort_while_quiescing_drains_both_then_undoes_the_roles() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]  # QuiesceSource, SetRoles in flight
    assert d.done("SetRoles") == []  # drain the quiesce too
    # No record moved and nothing started yet: neither is undone.
    assert d.done("QuiesceSource") == [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]
    assert d.done("SetRoles") == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.ABORTING), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.ABORTED)]


def test_abort_in_switching_after_quiesce() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]  # SetRoles in flight
    assert d.done("SetRoles") == [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]
    assert d.done("SetRoles") == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.ABORTING), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.ABORTED)]


def test_abort_in_switching_drains_the_start_then_undoes_all() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    d.done("MoveRecord")
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]  # StartOnTarget in flight
    assert d.done("StartOnTarget") == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.ABORTED)


def test_abort_in_post_sync_stops_the_fill_at_once() -> None:
    d = Driver()
    to_post_sync(d)
    assert d.send(AbortRequested()) == [P(Phase.ABORTING), StopFill(), StopTarget()]
    finish_rollback(d, Phase.ABORTED)
    # A late answer from the cancelled fill is ignored.
    assert d.send(Done(StartFill(rate_bytes_s=None, seq=11))) == []


def test_abort_in_verifying_waits_for_verify() -> None:
    d = Driver()
    to_post_sync(d)
    d.done("StartFill")
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]
    assert d.done("Verify") == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.ABORTED)


def test_abort_after_commit_is_refused_and_changes_nothing() -> None:
    d = Driver()
    to_post_sync(d)
    d.done("StartFill")
    d.done("Verify")
    before = d.m.to_dict()
    with pytest.raises(AbortRefused):
        d.send(AbortRequested())
    assert d.m.to_dict() == before
    assert d.done("ReleaseSource") == [P(Phase.COMMITTED)]
    with pytest.raises(AbortRefused):
        d.send(AbortRequested())


def test_abort_in_post_sync_while_source_down_keeps_target_running_until_source_returns() -> None:
    d = Driver()
    to_post_sync(d)
    assert d.send(HostDown(SRC)) == [P(Phase.POST_SYNC), StopFill()]
    assert d.send(AbortRequested()) == [P(Phase.ABORTING)]
    assert d.m.status().blocked_on == SRC
    assert d.send(HostUp(SRC)) == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.ABORTED)


# -- faults ----------------------------------------------------------------------------


def test_target_down_in_post_sync_fails_back_and_cleans_up_when_it_returns() -> None:
    d = Driver()
    to_post_sync(d)
    # The target's domain died with it; the source is current (mirror was synchronous).
    assert d.send(HostDown(DST)) == [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]
    assert d.done("SetRoles") == [P(Phase.ABORTING), MoveRecord(to_host=SRC)]
    assert d.done("MoveRecord") == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.FAILED_BACK)]
    assert d.m.cause is Cause.FAULT
    assert d.m.leftovers == {"target:target_running", "target:target_prepared"}
    assert d.send(HostUp(DST)) == [P(Phase.FAILED_BACK), StopTarget()]
    assert d.done("StopTarget") == [P(Phase.FAILED_BACK), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.FAILED_BACK)]
    assert d.m.settled and d.m.phase is Phase.FAILED_BACK


def test_source_down_in_post_sync_keeps_running_and_resumes_the_fill() -> None:
    d = Driver()
    to_post_sync(d)
    d.send(Progress(1000, 1 << 20))
    assert d.send(HostDown(SRC)) == [P(Phase.POST_SYNC), StopFill()]
    assert d.m.phase is Phase.POST_SYNC and d.m.status().blocked_on == SRC
    assert d.send(Tick(), dt=100) == []
    assert d.send(HostUp(SRC)) == [P(Phase.POST_SYNC), ResyncSource()]
    assert d.done("ResyncSource") == [P(Phase.POST_SYNC), StartFill(rate_bytes_s=None)]
    assert d.done("StartFill") == [P(Phase.VERIFYING), Verify()]
    assert d.done("Verify") == [P(Phase.COMMITTED), ReleaseSource()]


def test_source_down_in_verifying_goes_back_to_post_sync() -> None:
    d = Driver()
    to_post_sync(d)
    d.done("StartFill")
    assert d.send(HostDown(SRC)) == [P(Phase.POST_SYNC)]
    assert d.send(HostUp(SRC)) == [P(Phase.POST_SYNC), ResyncSource()]
    d.done("ResyncSource")
    assert d.done("StartFill") == [P(Phase.VERIFYING), Verify()]


def test_link_cut_in_post_sync_retries_after_a_wakeup() -> None:
    d = Driver()
    to_post_sync(d)
    assert d.fail("StartFill", UNREACHABLE) == [P(Phase.POST_SYNC), Wakeup(2.0)]
    assert d.send(Tick(), dt=0.5) == []  # not due yet
    assert d.send(Tick(), dt=2.0) == [P(Phase.POST_SYNC), ResyncSource()]
    assert d.fail("ResyncSource", UNREACHABLE) == [Wakeup(2.0)]
    assert d.send(Tick(), dt=3.0) == [P(Phase.POST_SYNC), ResyncSource()]
    assert d.done("ResyncSource") == [P(Phase.POST_SYNC), StartFill(rate_bytes_s=None)]


def test_source_and_target_down_waits_for_the_target_when_source_fell_behind() -> None:
    d = Driver()
    to_post_sync(d)
    d.send(HostDown(SRC))  # target keeps writing; the source falls behind
    assert d.send(HostDown(DST)) == [P(Phase.ABORTING)]
    assert d.m.status().blocked_on == SRC
    assert d.send(HostUp(SRC)) == [P(Phase.ABORTING)]
    # Failing back now would lose the writes only the target has: wait for it.
    assert d.m.status().blocked_on == DST
    assert d.send(HostUp(DST)) == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.FAILED_BACK)


def test_verify_mismatch_fails_back() -> None:
    d = Driver()
    to_post_sync(d)
    d.done("StartFill")
    assert d.fail("Verify", "checksum mismatch at block 7") == [P(Phase.ABORTING), StopTarget()]
    assert d.m.reason is not None and "checksum mismatch" in d.m.reason
    finish_rollback(d, Phase.FAILED_BACK)


def test_prepare_failure_fails_back_without_touching_the_source() -> None:
    d = Driver()
    d.start()
    assert d.fail("PrepareTarget", "no space") == [P(Phase.ABORTING), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.FAILED_BACK)]


def test_start_on_target_failure_rolls_back_everything() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    d.done("MoveRecord")
    assert d.fail("StartOnTarget") == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.FAILED_BACK)


def test_target_down_in_switching_skips_what_only_it_could_do() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    # StartOnTarget is in flight and can no longer be answered; the record's move (the
    # controller's) is drained, then undone.
    assert d.send(HostDown(DST)) == [P(Phase.ABORTING)]
    # Stopping the target and resyncing from it are skipped with it gone (the source is
    # current: the mirror never broke); what only the target could undo is left over.
    assert d.done("MoveRecord") == [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]
    assert d.done("SetRoles") == [P(Phase.ABORTING), MoveRecord(to_host=SRC)]
    assert d.done("MoveRecord") == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.FAILED_BACK)]
    assert d.m.leftovers == {"target:target_prepared", "target:target_running"}


def test_target_down_while_quiescing_skips_what_only_it_could_do() -> None:
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    # SetRoles(target primary) is in flight and can no longer be answered.
    assert d.send(HostDown(DST)) == [P(Phase.ABORTING), SetRoles(primary=SRC, secondary=DST)]
    assert d.done("SetRoles") == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.FAILED_BACK)]
    assert d.m.leftovers == {"target:target_prepared"}


def test_failed_rollback_step_is_retried() -> None:
    d = Driver()
    to_post_sync(d)
    d.send(AbortRequested())
    assert d.fail("StopTarget", "busy") == [Wakeup(2.0)]
    assert d.send(Tick(), dt=2.5) == [P(Phase.ABORTING), StopTarget()]


def test_release_is_retried_until_the_source_takes_it() -> None:
    d = Driver()
    to_post_sync(d)
    d.done("StartFill")
    d.done("Verify")
    assert d.fail("ReleaseSource", "busy") == [Wakeup(2.0)]
    assert d.send(HostDown(SRC)) == [P(Phase.COMMITTED)]
    assert d.send(Tick(), dt=5) == []  # source down: wait for it
    assert d.send(HostUp(SRC)) == [P(Phase.COMMITTED), ReleaseSource()]
    assert d.done("ReleaseSource") == [P(Phase.COMMITTED)]
    assert d.m.settled


def test_stop_and_copy_source_down_during_copy_waits_to_resume_on_source() -> None:
    d = Driver(mode=Mode.STOP_AND_COPY)
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")  # the copy is running
    assert d.send(HostDown(SRC)) == [P(Phase.ABORTING), StopFill()]
    assert d.send(HostUp(SRC)) == [P(Phase.ABORTING), ResumeOnSource()]
    assert d.done("ResumeOnSource") == [P(Phase.ABORTING), DiscardTarget()]
    assert d.done("DiscardTarget") == [P(Phase.FAILED_BACK)]


def test_unrelated_hosts_and_stale_answers_are_ignored() -> None:
    d = Driver()
    d.start()
    assert d.send(HostDown("h9")) == []
    assert d.send(Done(PrepareTarget(lazy=True, seq=999))) == []
    assert d.send(Done(QuiesceSource())) == []
    assert d.pending_kinds() == ["PrepareTarget"]


# -- progress --------------------------------------------------------------------------


def test_progress_never_goes_backwards_and_gives_an_eta() -> None:
    d = Driver(volume_bytes=1000)
    to_post_sync(d)
    d.send(Progress(100, 1000), dt=1.0)
    d.send(Progress(300, 1000), dt=1.0)  # 200 B/s
    st = d.m.status()
    assert st.present_bytes == 300
    assert st.rate_bytes_s == pytest.approx(200.0)
    assert st.eta_s == pytest.approx(3.5)
    assert d.send(Progress(200, 1000), dt=1.0) == []  # out of order: ignored, not stored
    assert d.m.status().present_bytes == 300
    d.send(Progress(5000, 1000), dt=1.0)  # clamped to the total
    assert d.m.status().present_bytes == 1000
    assert d.m.status().eta_s == 0.0


# -- refusals --------------------------------------------------------------------------


def test_admission_refusals() -> None:
    from migration_machine_driver import make_spec

    up = {SRC: True, DST: True, "h2": False}
    admit(make_spec(), hosts_up=up, active=[])
    with pytest.raises(MigrationRefused, match="already on"):
        admit(make_spec(target=SRC), hosts_up=up, active=[])
    with pytest.raises(NotFound):
        admit(make_spec(target="nowhere"), hosts_up=up, active=[])
    with pytest.raises(MigrationRefused, match="down"):
        admit(make_spec(target="h2"), hosts_up=up, active=[])
    running = Migration(make_spec())
    running.start(0.0)
    with pytest.raises(MigrationRefused, match="already migrating"):
        admit(make_spec(migration_id="m2"), hosts_up=up, active=[running])
    # Another domain may migrate meanwhile; a settled migration blocks nothing.
    admit(make_spec(migration_id="m3", domain="other"), hosts_up=up, active=[running])
    aborted = Migration(make_spec())
    aborted.handle(AbortRequested(), 0.0)
    admit(make_spec(migration_id="m4"), hosts_up=up, active=[aborted])


def test_constructor_and_double_start_refused() -> None:
    from migration_machine_driver import make_spec

    with pytest.raises(MigrationRefused):
        Migration(make_spec(target=SRC))
    d = Driver()
    d.start()
    with pytest.raises(MigrationRefused):
        d.start()


def test_regression_source_down_after_switch_in_switching_marks_source_stale() -> None:
    """Found by the fuzz test: with the target already running, a source that went down
    in *switching* (not post_sync) was still believed current, so a later target crash
    failed back onto a source missing acknowledged writes."""
    d = Driver()
    d.start()
    d.done("PrepareTarget")
    d.done("QuiesceSource")
    d.done("SetRoles")
    d.done("MoveRecord")  # StartOnTarget in flight: the target may serve writes already
    assert d.send(HostDown(SRC)) == [P(Phase.ABORTING)]
    assert not d.m.source_current
    d.done("StartOnTarget")
    d.send(HostDown(DST))
    d.send(HostUp(SRC))
    # The target holds writes the source lacks: wait for it rather than resume.
    assert d.m.status().blocked_on == DST
    assert d.pending_kinds() == []
    assert d.send(HostUp(DST)) == [P(Phase.ABORTING), StopTarget()]
    finish_rollback(d, Phase.FAILED_BACK)
