"""Random event sequences against a model of the world the migration commands act on.

The world model performs commands (possibly even when it reports them failed, as a lost
answer would), crashes and revives hosts, cuts the link, restarts the controller from
the last persisted snapshot, and checks after every step that:

- the domain runs on at most one host, and only on a primary copy's host (SetRoles
  makes the new primary's copy primary at once; the old primary's demotion waits until
  the domain stopped there, as the runner queues it behind the quiesce);
- the domain is never resumed on a source that lacks a write the target acknowledged;
- nothing is started on the target unless its copy is primary and the source stopped;
- progress never goes backwards, also across restarts;
- the durable state only changes in batches that start with PersistPhase;
- after the faults stop, the migration ends settled: committed on the target with the
  source released, or rolled back onto the source with the target cleaned.
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, given, settings
from migration_machine_driver import DST, SRC, make_spec

from edgevisor.migration.commands import (
    AbortRefused,
    AbortRequested,
    Command,
    Done,
    Event,
    Failed,
    HostDown,
    HostUp,
    Mode,
    PersistPhase,
    Phase,
    Progress,
    Tick,
)
from edgevisor.migration.machine import UNREACHABLE, Migration

_ORDER = [
    Phase.REQUESTED,
    Phase.PREPARING,
    Phase.SWITCHING,
    Phase.POST_SYNC,
    Phase.VERIFYING,
    Phase.ABORTING,
    Phase.ABORTED,
    Phase.FAILED_BACK,
    Phase.COMMITTED,
]


class World:
    def __init__(self) -> None:
        self.up = {SRC: True, DST: True}
        self.running: set[str] = {SRC}
        self.primary = SRC
        self.lagging: str | None = None  # an ex-primary whose demotion waits for its stop
        self.record = SRC
        self.has_address = False
        self.source_stale = False
        self.source_volume = True
        self.target_volume = False
        self.committed = False
        self.verified = False
        self.source_quiesced = False

    def check(self) -> None:
        assert len(self.running) <= 1, self.running
        assert self.running <= {self.primary, self.lagging}, (self.running, self.primary)

    def writes_happen(self) -> None:
        # A domain on the target keeps writing; without the source those writes are
        # only on the target.
        if DST in self.running and not self.up[SRC]:
            self.source_stale = True

    def crash(self, host: str) -> None:
        self.up[host] = False
        self.running.discard(host)
        if self.lagging == host:
            self.lagging = None

    def revive(self, host: str) -> None:
        """The host is back; its agent's restart policy starts the domain it owns:
        the source's before the commit unless quiesced, the target's after it."""
        self.up[host] = True
        owner = DST if self.committed else SRC
        quiesced = host == SRC and self.source_quiesced
        if host == owner == self.primary and not self.running and not quiesced:
            self.running.add(host)

    def perform(self, cmd: Command) -> None:
        kind = cmd.kind
        if kind == "PrepareTarget":
            self.target_volume = True
        elif kind == "QuiesceSource":
            self.running.discard(SRC)
            self.source_quiesced = True
            if self.lagging == SRC:
                self.lagging = None
        elif kind == "SetRoles":
            self.primary = cmd.primary  # type: ignore[attr-defined]
            secondary = cmd.secondary  # type: ignore[attr-defined]
            self.lagging = secondary if secondary in self.running else None
        elif kind == "StartOnTarget":
            assert self.primary == DST, "started on a secondary copy"
            assert SRC not in self.running, "started while the source still runs"
            self.running.add(DST)
        elif kind == "MoveRecord":
            # moved with the start, after the stop on the source (never off a domain
            # that still serves there)
            assert cmd.to_host == SRC or SRC not in self.running, "moved off a running source"  # type: ignore[attr-defined]
            self.record = cmd.to_host  # type: ignore[attr-defined]
        elif kind == "ResyncSource":
            if self.up[SRC] and DST not in self.running:
                self.source_stale = False
            elif self.up[SRC]:
                self.source_stale = False  # the mirror is whole again from here on
        elif kind == "ReleaseSource":
            assert self.committed, "released the source before the commit"
            assert self.verified, "released the source before a verify succeeded"
            self.source_volume = False
        elif kind == "StopTarget":
            self.running.discard(DST)
            if self.lagging == DST:
                self.lagging = None
        elif kind == "ResumeOnSource":
            assert not self.committed, "resumed on the source after the commit"
            assert self.primary == SRC, "resumed on a secondary copy"
            assert not self.source_stale, "resumed on a source missing acknowledged writes"
            assert DST not in self.running, "resumed while the target still runs"
            assert self.record == SRC, "resumed before the record came back"
            self.running.add(SRC)
            self.source_quiesced = False
        elif kind == "DiscardTarget":
            assert DST not in self.running
            self.target_volume = False
        self.check()


class Harness:
    def __init__(self, mode: Mode, has_address: bool) -> None:
        self.m = Migration(make_spec(mode=mode, has_address=has_address, volume_bytes=1000))
        self.w = World()
        self.w.has_address = has_address
        self.now = 0.0
        self.max_present = 0
        self.snapshot: dict[str, Any] = self.m.to_dict()
        self.phases_seen: set[Phase] = set()
        self.apply(self.m.start(self.now))

    def durable(self, d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("next_seq", "rate_bytes_s")}

    def apply(self, out: list[Command]) -> None:
        if out and isinstance(out[0], PersistPhase):
            assert out[0].phase is self.m.phase
            self.snapshot = json.loads(json.dumps(self.m.to_dict()))
        assert not any(isinstance(c, PersistPhase) for c in out[1:])
        # Write-ahead: whatever a restart would load equals the live durable state.
        assert self.durable(self.snapshot) == self.durable(self.m.to_dict())
        self.phases_seen.add(self.m.phase)
        if self.m.phase is Phase.COMMITTED:
            assert self.w.verified, "committed without a successful verify"
            self.w.committed = True
        st_ = self.m.status()
        assert st_.present_bytes >= self.max_present
        assert st_.present_bytes <= st_.total_bytes
        self.max_present = st_.present_bytes

    def send(self, ev: Event) -> None:
        self.apply(self.m.handle(ev, self.now))

    def answer_done(self, cmd: Command) -> None:
        self.w.perform(cmd)
        self.w.verified |= cmd.kind == "Verify"
        self.send(Done(cmd))

    def restart(self, perform_lost: list[bool]) -> None:
        pending = sorted(self.m.pending.values(), key=lambda c: c.seq)
        for cmd, did in zip(pending, perform_lost, strict=False):
            if did and self.w.up.get(_host_of(self.m, cmd), True):
                self.w.perform(cmd)
        self.m = Migration.from_dict(self.snapshot)
        self.apply(self.m.resume(self.now))


def _host_of(m: Migration, cmd: Command) -> str:
    if cmd.actor == "source":
        return SRC
    if cmd.actor == "target":
        return DST
    return "controller"


CALM = ["answer"] * 12 + ["up", "tick", "progress"] * 2 + ["down", "abort", "restart", "cut"]
STORMY = ["answer"] * 3 + ["up", "tick", "progress", "down", "abort", "restart", "cut"]


def _step(h: Harness, data: st.DataObject, weather: list[str] = CALM) -> None:
    m, w = h.m, h.w
    pending = sorted(m.pending.values(), key=lambda c: c.seq)
    choice = data.draw(st.sampled_from(weather))
    h.now += data.draw(st.sampled_from([0.001, 0.5, 3.0]))
    if choice == "answer" and pending:
        cmd = data.draw(st.sampled_from(pending))
        if not w.up.get(_host_of(m, cmd), True):
            return  # a dead host answers nothing
        outcome = data.draw(st.sampled_from(["done"] * 6 + ["fail", "fail_did", "cut"]))
        if outcome in ("done", "fail_did"):
            w.perform(cmd)
        if outcome == "done":
            h.w.verified |= cmd.kind == "Verify"
            h.send(Done(cmd))
        elif outcome == "cut":
            if DST in w.running:
                w.source_stale = True  # the mirror broke with the link
            h.send(Failed(cmd, UNREACHABLE))
        else:
            h.send(Failed(cmd, "boom"))
    elif choice == "cut" and m.phase is Phase.POST_SYNC:
        # The target notices the cut link through its fill.
        fills = [c for c in pending if c.kind == "StartFill"]
        if fills:
            if DST in w.running:
                w.source_stale = True
            h.send(Failed(fills[0], UNREACHABLE))
    elif choice == "down":
        host = data.draw(st.sampled_from([SRC, DST]))
        if w.up[host]:
            w.crash(host)
            h.send(HostDown(host))
    elif choice == "up":
        host = data.draw(st.sampled_from([SRC, DST]))
        if not w.up[host]:
            w.revive(host)
            h.send(HostUp(host))
    elif choice == "abort":
        before = m.to_dict()
        try:
            h.send(AbortRequested())
        except AbortRefused:
            assert m.phase is Phase.COMMITTED
            assert m.to_dict() == before
    elif choice == "tick":
        h.send(Tick())
    elif choice == "progress":
        present = data.draw(st.integers(0, 1200))
        h.send(Progress(present, 1000))
    elif choice == "restart":
        h.restart(data.draw(st.lists(st.booleans(), max_size=4)))
    w.writes_happen()
    w.check()


def _heal(h: Harness) -> None:
    """No more faults: hosts come back, every command succeeds, timers fire."""
    for host in (SRC, DST):
        if not h.w.up[host]:
            h.w.revive(host)
            h.send(HostUp(host))
    for _ in range(100):
        if h.m.settled:
            return
        pending = sorted(h.m.pending.values(), key=lambda c: c.seq)
        if pending:
            h.answer_done(pending[0])
        else:
            h.now += 10.0
            h.send(Tick())
        h.w.check()
    raise AssertionError(f"did not settle: {h.m.to_dict()} pending={h.m.pending}")


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    mode=st.sampled_from(list(Mode)),
    has_address=st.booleans(),
    data=st.data(),
)
def test_random_event_sequences_keep_the_invariants(
    mode: Mode, has_address: bool, data: st.DataObject
) -> None:
    h = Harness(mode, has_address)
    # Reach every phase often: first some fault-free steps, then anything goes.
    for _ in range(data.draw(st.integers(0, 9))):
        pending = sorted(h.m.pending.values(), key=lambda c: c.seq)
        if pending:
            h.answer_done(pending[0])
    for _ in range(data.draw(st.integers(0, 60))):
        _step(h, data)
    phases_seen = h.phases_seen
    _heal(h)
    forward = [p for p in _ORDER if p in phases_seen and _ORDER.index(p) < 5]
    event(f"got to {forward[-1]} before healing, ended {h.m.phase}")
    _check_final(h, has_address)
    if h.m.phase is Phase.COMMITTED:
        assert h.m.status().present_bytes == 1000


def _check_final(h: Harness, has_address: bool) -> None:
    m, w = h.m, h.w
    assert m.final and m.settled
    if m.phase is Phase.COMMITTED:
        assert w.primary == DST and w.running == {DST}
        assert not w.source_volume
        if has_address:
            assert w.record == DST
    else:
        assert w.primary == SRC and w.running == {SRC}
        assert w.record == SRC
        assert not w.source_stale
        assert w.source_volume
        assert not w.target_volume


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_faults_during_post_sync_keep_the_invariants(data: st.DataObject) -> None:
    h = Harness(Mode.POST_COPY, has_address=True)
    while h.m.phase is not Phase.POST_SYNC:
        h.answer_done(min(h.m.pending.values(), key=lambda c: c.seq))
    for _ in range(data.draw(st.integers(1, 40))):
        _step(h, data, STORMY)
    event(f"post_sync storm ended {h.m.phase}")
    _heal(h)
    _check_final(h, has_address=True)


@settings(max_examples=50, deadline=None)
@given(mode=st.sampled_from(list(Mode)))
def test_without_faults_every_migration_commits(mode: Mode) -> None:
    h = Harness(mode, has_address=True)
    _heal(h)
    assert h.m.phase is Phase.COMMITTED
    assert h.w.running == {DST}
