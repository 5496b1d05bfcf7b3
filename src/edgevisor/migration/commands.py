"""Vocabulary of the migration state machine: phases, commands out, events in, errors.

Commands are what the machine asks the world to do; events are what the world reports
back. Both are frozen dataclasses so tests can compare exact sequences. Every command
carries a ``seq`` assigned by the machine and excluded from equality: a ``Done``/``Failed``
is matched to the command it answers by ``seq``, so a late answer to a command the
machine has since given up on is recognised as stale and ignored, while tests can still
write ``PrepareTarget(lazy=True)`` without knowing the number.

Who performs a command (``Command.actor``): ``"target"`` / ``"source"`` — the agent on
that host; ``"controller"`` — the controller itself; ``"runner"`` — the runner's own
bookkeeping (persist, timers). Only commands with ``expects_reply`` are answered with
``Done``/``Failed``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from edgevisor.errors import Conflict

__all__ = [
    "FINAL_PHASES",
    "AbortRefused",
    "AbortRequested",
    "Cause",
    "Command",
    "DiscardTarget",
    "Done",
    "Event",
    "Failed",
    "HostDown",
    "HostUp",
    "MigrationRefused",
    "MigrationSpec",
    "MigrationStatus",
    "Mode",
    "MoveRecord",
    "PersistPhase",
    "Phase",
    "PrepareTarget",
    "Progress",
    "QuiesceSource",
    "ReleaseSource",
    "ResumeOnSource",
    "ResyncSource",
    "SetRoles",
    "StartFill",
    "StartOnTarget",
    "StopFill",
    "StopTarget",
    "Tick",
    "Verify",
    "Wakeup",
]


class Phase(enum.StrEnum):
    REQUESTED = "requested"
    PREPARING = "preparing"
    SWITCHING = "switching"
    POST_SYNC = "post_sync"
    VERIFYING = "verifying"
    COMMITTED = "committed"
    ABORTING = "aborting"
    ABORTED = "aborted"
    FAILED_BACK = "failed_back"


FINAL_PHASES = frozenset({Phase.COMMITTED, Phase.ABORTED, Phase.FAILED_BACK})


class Mode(enum.StrEnum):
    POST_COPY = "post-copy"
    """Switch first, then fill the target from the source (the product's mode)."""
    STOP_AND_COPY = "stop-and-copy"
    """Baseline: stop, copy everything, verify, then start on the target."""


class Cause(enum.StrEnum):
    """Why a migration is rolling back; decides aborted vs failed_back."""

    ABORT = "abort"
    FAULT = "fault"
    RESTART = "restart"


@dataclass(frozen=True)
class MigrationSpec:
    """What is migrated where, and how; fixed for the migration's life.

    ``volume_bytes`` is the initial progress total (the fill's reports may raise it);
    ``has_address`` adds MoveRecord; ``rate_bytes_s`` limits the fill (None: unlimited);
    ``retry_delay_s`` spaces retries after a link cut or a failed undo/release.
    """

    migration_id: str
    domain: str
    source: str
    target: str
    volume_bytes: int
    mode: Mode = Mode.POST_COPY
    has_address: bool = False
    rate_bytes_s: int | None = None
    retry_delay_s: float = 2.0


@dataclass(frozen=True)
class MigrationStatus:
    """What ``domain show``, the SSE stream and the progress bar display."""

    migration_id: str
    domain: str
    phase: Phase
    present_bytes: int
    total_bytes: int
    rate_bytes_s: float | None
    eta_s: float | None
    downtime_s: float | None
    blocked_on: str | None
    cause: Cause | None
    reason: str | None
    settled: bool


# -- errors ----------------------------------------------------------------------------


class MigrationRefused(Conflict):
    """A migration cannot start (same host, host down, domain already migrating)."""

    code = "migration_refused"


class AbortRefused(Conflict):
    """An abort arrived after the commit point; the migration is complete."""

    code = "abort_refused"


# -- commands --------------------------------------------------------------------------

Actor = Literal["source", "target", "controller", "runner"]


@dataclass(frozen=True)
class Command:
    actor: ClassVar[Actor] = "runner"
    expects_reply: ClassVar[bool] = True
    seq: int = field(default=0, compare=False, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class PersistPhase(Command):
    """Write ``Migration.to_dict()`` to the store before performing the next command."""

    expects_reply: ClassVar[bool] = False
    phase: Phase


@dataclass(frozen=True)
class Wakeup(Command):
    """Deliver a ``Tick`` after ``delay_s`` (retries; the machine never reads a clock)."""

    expects_reply: ClassVar[bool] = False
    delay_s: float


@dataclass(frozen=True)
class PrepareTarget(Command):
    """Create the domain's volume on the target and authenticate the link to the source.

    ``lazy``: the volume reads missing blocks from the source copy on demand (post-copy);
    otherwise it is an empty volume that the fill copies into (stop-and-copy).
    """

    actor: ClassVar[Actor] = "target"
    lazy: bool


@dataclass(frozen=True)
class QuiesceSource(Command):
    """Freeze the domain on the source, flush its volume, stop it (idempotent)."""

    actor: ClassVar[Actor] = "source"


@dataclass(frozen=True)
class SetRoles(Command):
    """Make ``primary``'s copy primary and ``secondary``'s secondary.

    Applied on the new primary first: from then on that host refuses mirrored writes
    from the other, which fences a partitioned ex-primary. ``Done`` means the new
    primary has applied it; the other side follows (or learns on rejoin). Until
    ``ReleaseSource``, the primary mirrors every write to the secondary synchronously
    while it can reach it, and records what it could not mirror (for ``ResyncSource``).
    """

    actor: ClassVar[Actor] = "controller"
    primary: str
    secondary: str


@dataclass(frozen=True)
class StartOnTarget(Command):
    """Start the domain on the target on its (lazy) volume."""

    actor: ClassVar[Actor] = "target"


@dataclass(frozen=True)
class MoveRecord(Command):
    """Point the domain's address record at ``to_host`` (only for domains with an address)."""

    actor: ClassVar[Actor] = "controller"
    to_host: str


@dataclass(frozen=True)
class StartFill(Command):
    """Copy every block the target lacks from the source; ``Done`` when all are present.

    Resumes from the target's bitmap when issued again. ``rate_bytes_s`` None = unlimited.
    """

    actor: ClassVar[Actor] = "target"
    rate_bytes_s: int | None


@dataclass(frozen=True)
class StopFill(Command):
    """Stop a running fill now (its ``Done``/``Failed`` will be ignored)."""

    actor: ClassVar[Actor] = "target"
    expects_reply: ClassVar[bool] = False


@dataclass(frozen=True)
class ResyncSource(Command):
    """Push to the source every block written on the target while the source was away.

    After it, the source copy again holds every acknowledged write (rollback is safe).
    """

    actor: ClassVar[Actor] = "target"


@dataclass(frozen=True)
class Verify(Command):
    """Compare checksums of both copies (writes held); ``Failed`` on a mismatch."""

    actor: ClassVar[Actor] = "target"


@dataclass(frozen=True)
class ReleaseSource(Command):
    """After commit: end mirroring on the target; delete the source's domain and volume."""

    actor: ClassVar[Actor] = "source"


@dataclass(frozen=True)
class StopTarget(Command):
    """Rollback: stop the domain on the target (idempotent)."""

    actor: ClassVar[Actor] = "target"


@dataclass(frozen=True)
class ResumeOnSource(Command):
    """Rollback: start the domain on the source on its complete copy (idempotent)."""

    actor: ClassVar[Actor] = "source"


@dataclass(frozen=True)
class DiscardTarget(Command):
    """Rollback: delete the target's volume and any domain leftovers (idempotent)."""

    actor: ClassVar[Actor] = "target"


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class Done(Event):
    cmd: Command


@dataclass(frozen=True)
class Failed(Event):
    cmd: Command
    reason: str


@dataclass(frozen=True)
class Progress(Event):
    """Fill progress as reported by the target; may arrive out of order."""

    present_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class HostDown(Event):
    host: str


@dataclass(frozen=True)
class HostUp(Event):
    host: str


@dataclass(frozen=True)
class AbortRequested(Event):
    pass


@dataclass(frozen=True)
class Tick(Event):
    """A ``Wakeup`` fell due (or any periodic poke); the time is ``handle``'s ``now``."""
