"""The post-switch migration of one domain, as one explicit, pure state machine.

Theory of operation
===================

A migration moves a running domain and its volume from ``source`` to ``target``. The
machine performs no I/O and reads no clock: the runner calls ``start(now)``, then
``handle(event, now)`` for every event, and performs the commands returned (in order).
Commands that expect an answer are answered with ``Done(cmd)`` or ``Failed(cmd, reason)``.

Forward path (post-copy, the product's mode), one step at a time (``table.PLANS``;
the commands of one step are issued together and the step ends when all are done)::

    requested ─▶ preparing   PrepareTarget(lazy)          target: domain defined, its
                                                          cgroups and namespace staged;
                                                          source: volume flushed ahead
              ─▶ switching   QuiesceSource                 ┐ downtime: from issuing
                             + SetRoles(target primary)    │ QuiesceSource to
                             [MoveRecord(target)]          │ StartOnTarget done
                             + StartOnTarget               ┘
              ─▶ post_sync   StartFill (ResyncSource first if the source fell behind)
              ─▶ verifying   Verify
              ─▶ committed   ReleaseSource                 ◀── the one commit point

The switch has two steps because each step costs the downtime a write-ahead persist
and a round trip. SetRoles runs with QuiesceSource: in post-copy the target's copy does
not exist yet (StartOnTarget creates it, primary), so the fence costs nothing there, and
the source's demotion is queued behind the quiesce on the source's host (the runner's
per-host FIFO). MoveRecord (only for a domain with a logical address) runs with
StartOnTarget, after the stop on the source: the move pushes the source first, so the
source stops translating for the address before the target does (fencing); moving it
any earlier would cut clients off a domain that still serves. If either of a step's
commands fails, the other is drained before the rollback starts.

The baseline ``stop-and-copy`` mode uses the same machine with another plan: quiesce,
fill, verify, set roles (+ move the record), start, commit.

Why rollback is always possible before the commit: the source copy is never written
after ``QuiesceSource``, except by the target's synchronous mirror, so it holds every
write the target acknowledged. When the mirror cannot reach the source (source down,
link cut) the target keeps running and records what the source misses; the machine
then believes ``source_current`` is False and a ``ResyncSource`` must succeed before
the source can be used again. Rollback itself also resyncs after stopping the target
(cheap when nothing is dirty), so a link cut the machine has not heard of yet cannot
lose a write either.

The one rollback path (``table.ROLLBACK_ORDER``) undoes whatever *may* have happened — every
effectful command adds its effect to ``effects`` when issued (pessimistically, since a
lost answer or a restart leaves its outcome unknown) and the undoing command removes it
when done. All commands are idempotent, so undoing something that never happened is
harmless. Order: StopTarget → ResyncSource → SetRoles(source primary) → MoveRecord back →
ResumeOnSource → DiscardTarget. A step whose host is down is skipped when skipping is
safe (a dead target runs nothing and its volume is left to the reconciler) and waited
for otherwise (only the source can resume the domain). Rollback ends in ``aborted``
(user abort) or ``failed_back`` (fault or restart).

Rules of the fault tables (``table.ON_HOST_DOWN``, ``table.ON_ABORT``):
- before post_sync any fault or abort rolls back;
- post_sync/verifying: target down → fail back automatically; source down or link cut
  (``Failed(..., UNREACHABLE)``) → keep running on the target, stop the fill, resume
  when the source is back (``HostUp``) or after a ``Wakeup`` retry;
- after the commit an abort is refused (``AbortRefused``) and nothing changes;
- an abort while a command is in flight waits for its answer (a fill is stopped at once)
  so the undo never races the do.

Persistence is write-ahead: any batch that carries an effectful command or changes the
durable state starts with ``PersistPhase``; the runner stores ``to_dict()`` before
performing the rest. ``from_dict`` + ``resume(now)`` after a restart:
requested → start; preparing/switching → roll back (outcomes unknown, effects say what
to undo); post_sync → continue the fill (resync first if needed); verifying → verify
again; committed → release the source if not yet done; aborting → continue the rollback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from edgevisor.migration.admission import admit
from edgevisor.migration.commands import (
    FINAL_PHASES,
    AbortRefused,
    AbortRequested,
    Cause,
    Command,
    DiscardTarget,
    Done,
    Event,
    Failed,
    HostDown,
    HostUp,
    MigrationRefused,
    MigrationSpec,
    MigrationStatus,
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
from edgevisor.migration.machine_state import durable, note_progress, restore, spec_of, status_of
from edgevisor.migration.table import EFFECT_OF, ON_ABORT, ON_HOST_DOWN, PLANS, ROLLBACK_ORDER

__all__ = [
    "ON_ABORT",
    "ON_HOST_DOWN",
    "PLANS",
    "ROLLBACK_ORDER",
    "UNREACHABLE",
    "Migration",
    "MigrationSpec",
    "MigrationStatus",
    "admit",
]

UNREACHABLE: Final = "unreachable"
"""``Failed`` reason meaning the link between the hosts is cut (not a data problem)."""

_SYNC_KINDS: Final = frozenset({"StartFill", "ResyncSource", "Verify"})


class Migration:
    """One migration. ``start``/``handle``/``resume`` return the commands to perform."""

    def __init__(self, spec: MigrationSpec) -> None:
        if spec.source == spec.target:
            raise MigrationRefused("source and target are the same host")
        self.spec = spec
        self.plan = tuple(
            (phase, tuple(k for k in kinds if k != "MoveRecord" or spec.has_address))
            for phase, kinds in PLANS[spec.mode]
        )
        self.phase = Phase.REQUESTED
        self.step = -1
        self.cause: Cause | None = None
        self.reason: str | None = None
        self.effects: set[str] = set()
        self.leftovers: set[str] = set()
        self.source_up = True
        self.target_up = True
        self.source_current = True
        self.released = False
        self.blocked_on: str | None = None
        self.pending: dict[int, Command] = {}
        self.retry_at: float | None = None
        self.next_seq = 1
        self.present_bytes = 0
        self.total_bytes = spec.volume_bytes
        self.rate_bytes_s: float | None = None
        self.last_progress: tuple[float, int] | None = None  # (time, bytes) of the last gain
        self.quiesce_at: float | None = None
        self.downtime_s: float | None = None

    # -- public API --------------------------------------------------------------------

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def settled(self) -> bool:
        """Final and no duty left: the source released, or every undo done.

        Cleanup skipped on a dead target (``leftovers``) does not count: it is retried
        when the target returns (``HostUp``) and is the reconciler's otherwise.
        """
        if not self.final or self.pending:
            return False
        if self.phase is Phase.COMMITTED:
            return self.released
        return not self.effects

    def start(self, now: float) -> list[Command]:
        if self.phase is not Phase.REQUESTED:
            raise MigrationRefused(f"migration {self.spec.migration_id} already started")
        return self._run(lambda: self._enter_step(0, now))

    def handle(self, event: Event, now: float) -> list[Command]:
        """Feed one event; returns the commands to perform, in order.

        Raises AbortRefused for an abort after the commit (the state is unchanged).
        """
        if isinstance(event, AbortRequested) and ON_ABORT[self.phase] == "refuse":
            raise AbortRefused(
                f"migration {self.spec.migration_id} is committed; the domain runs on "
                f"{self.spec.target!r}"
            )
        return self._run(lambda: self._dispatch(event, now))

    def resume(self, now: float) -> list[Command]:
        """After ``from_dict`` (a restart): continue or roll back, per phase."""
        return self._run(lambda: self._resume(now))

    def status(self) -> MigrationStatus:
        return status_of(self)

    def to_dict(self) -> dict[str, Any]:
        d = self._durable()
        d.update(next_seq=self.next_seq, rate_bytes_s=self.rate_bytes_s)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Migration:
        m = cls(spec_of(d))
        restore(m, d)
        return m

    # -- core --------------------------------------------------------------------------

    def _durable(self) -> dict[str, Any]:
        """The state a restart needs; any change of it makes the batch start with a
        PersistPhase (so the last snapshot stored always equals this)."""
        return durable(self)

    def _run(self, body: Callable[[], list[Command]]) -> list[Command]:
        before = self._durable()
        out = body()
        if before != self._durable() or any(c.expects_reply for c in out):
            # Write-ahead: the runner stores the snapshot before doing anything else.
            out.insert(0, PersistPhase(self.phase))
        return out

    def _seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def _side(self, host: str) -> str | None:
        if host == self.spec.source:
            return "source"
        if host == self.spec.target:
            return "target"
        return None

    def _host_up(self, side: str) -> bool:
        return {"source": self.source_up, "target": self.target_up}.get(side, True)

    def _needs(self, cmd: Command) -> str:
        """The side a command needs up (SetRoles: its new primary)."""
        if isinstance(cmd, SetRoles):
            return "target" if cmd.primary == self.spec.target else "source"
        return cmd.actor

    def _build(self, kind: str, *, undo: bool = False) -> Command:
        s = self.spec
        seq = self._seq()
        if kind == "PrepareTarget":
            return PrepareTarget(lazy=s.mode is Mode.POST_COPY, seq=seq)
        if kind == "QuiesceSource":
            return QuiesceSource(seq=seq)
        if kind == "SetRoles":
            if undo:
                return SetRoles(primary=s.source, secondary=s.target, seq=seq)
            return SetRoles(primary=s.target, secondary=s.source, seq=seq)
        if kind == "StartOnTarget":
            return StartOnTarget(seq=seq)
        if kind == "MoveRecord":
            return MoveRecord(to_host=s.source if undo else s.target, seq=seq)
        if kind == "StartFill":
            return StartFill(rate_bytes_s=s.rate_bytes_s, seq=seq)
        if kind == "Verify":
            return Verify(seq=seq)
        if kind == "ReleaseSource":
            return ReleaseSource(seq=seq)
        if kind == "ResyncSource":
            return ResyncSource(seq=seq)
        if kind == "StopTarget":
            return StopTarget(seq=seq)
        if kind == "ResumeOnSource":
            return ResumeOnSource(seq=seq)
        if kind == "DiscardTarget":
            return DiscardTarget(seq=seq)
        raise AssertionError(kind)

    def _issue(self, cmd: Command, now: float, *, undo: bool = False) -> Command:
        if cmd.expects_reply:
            self.pending[cmd.seq] = cmd
        if not undo:
            self.effects.update(EFFECT_OF.get(cmd.kind, ()))
        if isinstance(cmd, QuiesceSource) and self.quiesce_at is None:
            self.quiesce_at = now
        return cmd

    # -- forward path ------------------------------------------------------------------

    def _enter_step(self, index: int, now: float) -> list[Command]:
        self.step = index
        phase, kinds = self.plan[index]
        self.phase = phase
        if phase is Phase.POST_SYNC:
            return self._resume_sync(now)
        if phase is Phase.COMMITTED:
            # The commit point. The forward effects are now the desired state, not
            # something to undo.
            self.effects.clear()
            return self._release_if_due(now)
        return [self._issue(self._build(k), now) for k in kinds]

    def _advance(self, now: float) -> list[Command]:
        if self.step + 1 >= len(self.plan):
            return []
        return self._enter_step(self.step + 1, now)

    def _resume_sync(self, now: float) -> list[Command]:
        """post_sync: (re)start the fill, resyncing the source first if it fell behind."""
        if self.pending or self.retry_at is not None:
            return []
        if not self.source_up:
            self.blocked_on = self.spec.source
            return []
        self.blocked_on = None
        kind = "StartFill" if self.source_current else "ResyncSource"
        return [self._issue(self._build(kind), now)]

    def _degrade(self, now: float, *, link_cut: bool) -> list[Command]:
        """Source unreachable in post_sync/verifying: keep running on the target."""
        out: list[Command] = []
        for seq, cmd in list(self.pending.items()):
            if cmd.kind in _SYNC_KINDS:
                del self.pending[seq]
                if isinstance(cmd, StartFill) and self.target_up:
                    out.append(StopFill(seq=self._seq()))
        self.source_current = False
        self.phase = Phase.POST_SYNC
        self.step = next(i for i, (p, _) in enumerate(self.plan) if p is Phase.POST_SYNC)
        if link_cut:
            out.append(self._retry_later(now))
        else:
            self.blocked_on = self.spec.source
        return out

    def _retry_later(self, now: float) -> Wakeup:
        self.retry_at = now + self.spec.retry_delay_s
        return Wakeup(self.spec.retry_delay_s, seq=self._seq())

    # -- rollback path -----------------------------------------------------------------

    def _begin_rollback(self, cause: Cause, reason: str, now: float) -> list[Command]:
        out: list[Command] = []
        for seq, cmd in list(self.pending.items()):
            if isinstance(cmd, StartFill):  # the only command we cancel rather than drain
                del self.pending[seq]
                if self.target_up:
                    out.append(StopFill(seq=self._seq()))
        self.phase = Phase.ABORTING
        self.cause = cause
        self.reason = reason
        self.retry_at = None
        return out + self._rollback_step(now)

    def _rollback_step(self, now: float) -> list[Command]:
        if self.pending or self.retry_at is not None:
            return []  # drain in-flight commands first; or a retry is scheduled
        self.blocked_on = None
        if "source_stopped" in self.effects and not self.source_up:
            # Only the source can take the domain back: keep the target running (if it
            # is) until the source returns rather than stop it for nothing.
            self.blocked_on = self.spec.source
            return []
        for kind, effect, side, when_down in ROLLBACK_ORDER:
            if effect not in self.effects:
                continue
            if not self._host_up(side):
                if when_down == "skip" or (
                    when_down == "skip_if_source_current" and self.source_current
                ):
                    self.effects.discard(effect)
                    if kind != "ResyncSource":
                        self.leftovers.add(f"{side}:{effect}")
                    continue
                self.blocked_on = self.spec.source if side == "source" else self.spec.target
                return []
            if kind == "ResyncSource" and not self.source_up:
                self.blocked_on = self.spec.source
                return []
            return [self._issue(self._build(kind, undo=True), now, undo=True)]
        if not self.final:
            self.phase = Phase.ABORTED if self.cause is Cause.ABORT else Phase.FAILED_BACK
        return []

    # -- events ------------------------------------------------------------------------

    def _dispatch(self, event: Event, now: float) -> list[Command]:
        if isinstance(event, Done):
            return self._on_done(event.cmd, now)
        if isinstance(event, Failed):
            return self._on_failed(event.cmd, event.reason, now)
        if isinstance(event, Progress):
            self._on_progress(event, now)
            return []
        if isinstance(event, HostDown):
            return self._on_host_down(event.host, now)
        if isinstance(event, HostUp):
            return self._on_host_up(event.host, now)
        if isinstance(event, AbortRequested):
            return self._on_abort(now)
        if isinstance(event, Tick):
            return self._on_tick(now)
        raise TypeError(f"unknown event {event!r}")

    def _take(self, cmd: Command) -> Command | None:
        """The pending command this answers, or None for a stale/unknown answer."""
        mine = self.pending.get(cmd.seq)
        if mine is None or mine != cmd:
            return None
        del self.pending[cmd.seq]
        return mine

    def _on_done(self, answered: Command, now: float) -> list[Command]:
        cmd = self._take(answered)
        if cmd is None:
            return []
        self._apply_done(cmd, now)
        if self.phase is Phase.ABORTING or (self.final and self.phase is not Phase.COMMITTED):
            return self._rollback_step(now)
        if self.phase is Phase.COMMITTED:
            return []
        if isinstance(cmd, ResyncSource) and self.phase is Phase.POST_SYNC:
            return self._resume_sync(now)
        if self.pending:
            return []
        return self._advance(now)

    def _apply_done(self, cmd: Command, now: float) -> None:
        undo_effect = {
            "StopTarget": "target_running",
            "ResumeOnSource": "source_stopped",
            "DiscardTarget": "target_prepared",
        }
        if cmd.kind in undo_effect:
            self.effects.discard(undo_effect[cmd.kind])
            self.leftovers.discard(f"target:{undo_effect[cmd.kind]}")
        elif isinstance(cmd, SetRoles) and cmd.primary == self.spec.source:
            self.effects.discard("roles_switched")
        elif isinstance(cmd, MoveRecord) and cmd.to_host == self.spec.source:
            self.effects.discard("record_moved")
        elif isinstance(cmd, ResyncSource):
            self.source_current = True
            if "target_running" not in self.effects:
                self.effects.discard("target_dirty")  # target stopped: nothing more to push
        elif isinstance(cmd, StartOnTarget) and self.quiesce_at is not None:
            if self.downtime_s is None:
                self.downtime_s = max(now - self.quiesce_at, 0.0)
        elif isinstance(cmd, StartFill):
            self.present_bytes = self.total_bytes
        elif isinstance(cmd, ReleaseSource):
            self.released = True
            self.blocked_on = None

    def _on_failed(self, answered: Command, reason: str, now: float) -> list[Command]:
        cmd = self._take(answered)
        if cmd is None:
            return []
        if reason == UNREACHABLE and "target_running" in self.effects:
            self.source_current = False  # the mirror may have broken with the link
        if self.phase is Phase.ABORTING or self.final:
            if self.phase is Phase.COMMITTED:  # only ReleaseSource can fail here
                return self._retry_release(now)
            if self._is_undo(cmd) and self._host_up(self._needs(cmd)):
                return [self._retry_later(now)]
            return self._rollback_step(now)
        in_sync = self.phase in (Phase.POST_SYNC, Phase.VERIFYING)
        if in_sync and (isinstance(cmd, StartFill | ResyncSource) or reason == UNREACHABLE):
            return self._degrade(now, link_cut=self.source_up)
        return self._begin_rollback(Cause.FAULT, f"{cmd.kind} failed: {reason}", now)

    def _is_undo(self, cmd: Command) -> bool:
        if isinstance(cmd, SetRoles):
            return cmd.primary == self.spec.source
        if isinstance(cmd, MoveRecord):
            return cmd.to_host == self.spec.source
        return isinstance(cmd, StopTarget | ResumeOnSource | DiscardTarget | ResyncSource)

    def _retry_release(self, now: float) -> list[Command]:
        if not self.source_up:
            self.blocked_on = self.spec.source
            return []
        return [self._retry_later(now)]

    def _on_progress(self, ev: Progress, now: float) -> None:
        note_progress(self, ev.present_bytes, ev.total_bytes, now)

    def _on_host_down(self, host: str, now: float) -> list[Command]:
        side = self._side(host)
        if side is None:
            return []
        if side == "source":
            self.source_up = False
            if "target_running" in self.effects:
                # The target may be writing with nobody to mirror to, in any phase.
                self.source_current = False
        else:
            self.target_up = False
        # Commands that need the dead host will never be answered: forget them (their
        # effects stay recorded, so the rollback still undoes them).
        # A fill is left for _degrade/_begin_rollback, which also stop it.
        for seq, cmd in list(self.pending.items()):
            needs_source = cmd.kind in _SYNC_KINDS and not isinstance(cmd, StartFill)
            if self._needs(cmd) == side or (needs_source and side == "source"):
                del self.pending[seq]
        reaction = ON_HOST_DOWN[(self.phase, side)]
        if reaction == "rollback":
            if self.phase is Phase.ABORTING:
                return self._rollback_step(now)
            return self._begin_rollback(Cause.FAULT, f"{side} host {host!r} went down", now)
        if reaction == "degrade":
            return self._degrade(now, link_cut=False)
        if reaction == "wait":
            if self.phase is Phase.ABORTING:
                return self._rollback_step(now)
            if self.phase is Phase.COMMITTED and not self.released:
                self.blocked_on = host
        return []

    def _on_host_up(self, host: str, now: float) -> list[Command]:
        side = self._side(host)
        if side is None:
            return []
        if side == "source":
            self.source_up = True
        else:
            self.target_up = True
            # A target that comes back after we skipped its cleanup: clean it up now.
            for item in list(self.leftovers):
                if item.startswith("target:"):
                    self.leftovers.discard(item)
                    self.effects.add(item.split(":", 1)[1])
        if self.phase is Phase.POST_SYNC:
            return self._resume_sync(now)
        if self.phase is Phase.COMMITTED:
            return self._release_if_due(now)
        if self.phase is Phase.ABORTING or self.final:
            return self._rollback_step(now)
        return []

    def _release_if_due(self, now: float) -> list[Command]:
        if self.released or self.pending or self.retry_at is not None:
            return []
        if not self.source_up:
            self.blocked_on = self.spec.source
            return []
        self.blocked_on = None
        return [self._issue(self._build("ReleaseSource"), now)]

    def _on_abort(self, now: float) -> list[Command]:
        action = ON_ABORT[self.phase]
        if action == "abort_now":
            self.phase = Phase.ABORTED
            self.cause = Cause.ABORT
            self.reason = "aborted before start"
            return []
        if action == "rollback":
            return self._begin_rollback(Cause.ABORT, "abort requested", now)
        return []

    def _on_tick(self, now: float) -> list[Command]:
        if self.retry_at is None or now < self.retry_at:
            return []
        self.retry_at = None
        if self.phase is Phase.POST_SYNC:
            return self._resume_sync(now)
        if self.phase is Phase.COMMITTED:
            return self._release_if_due(now)
        if self.phase is Phase.ABORTING or self.final:
            return self._rollback_step(now)
        return []

    # -- restart -----------------------------------------------------------------------

    def _resume(self, now: float) -> list[Command]:
        self.pending.clear()
        self.retry_at = None
        if self.phase is Phase.REQUESTED:
            return self._enter_step(0, now)
        if self.phase in (Phase.PREPARING, Phase.SWITCHING):
            return self._begin_rollback(
                Cause.RESTART, f"controller restarted during {self.phase}", now
            )
        if self.phase is Phase.POST_SYNC:
            return self._resume_sync(now)
        if self.phase is Phase.VERIFYING:
            if not self.source_up:
                return self._degrade(now, link_cut=False)
            return [self._issue(self._build("Verify"), now)]
        if self.phase is Phase.COMMITTED:
            return self._release_if_due(now)
        return self._rollback_step(now)  # aborting, or final with cleanup duties left
