"""What hosts need and report: records per host, applied generations, leak collection.

The controller pushes to a host every bound record of each account that has an instance
on that host (:func:`records_for_host`; an agent rebuilds its tables from it after a
restart). Hosts report the generation they applied per record (:func:`report_applied`) and
the instances they run (:func:`report_instances`); :func:`list_records` shows both, with
the hosts that still drift. :func:`collect_leaks` releases addresses whose instance is
gone, only after a grace period and only if the record is unchanged since.

Like :mod:`edgevisor.network.records`, every function runs inside the caller's
transaction and never commits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Table, insert, select, update
from sqlalchemy.orm import Session

from edgevisor.errors import RequestError
from edgevisor.network.ipam import IpamSettings
from edgevisor.network.lifecycle import Event, State
from edgevisor.network.pools import REC, free_physical, utcnow
from edgevisor.network.records import AddressRecord, record_view, transition
from edgevisor.store.network_models import HostApplied

__all__ = [
    "AppliedReport",
    "AppliedState",
    "RecordStatus",
    "collect_leaks",
    "list_records",
    "records_for_host",
    "report_applied",
    "report_instances",
]

_REC = REC
_APPLIED: Table = HostApplied.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class AppliedState:
    host: str
    generation: int
    error: str | None
    at: datetime


@dataclass(frozen=True)
class RecordStatus:
    """A record, the hosts that must apply it, and what each host reported applying."""

    record: AddressRecord
    needed_by: tuple[str, ...]
    applied: tuple[AppliedState, ...]

    @property
    def drift(self) -> tuple[str, ...]:
        """Hosts that need the record but have not applied its current generation."""
        done = {a.host for a in self.applied if a.generation == self.record.generation}
        return tuple(h for h in self.needed_by if h not in done)


@dataclass(frozen=True)
class AppliedReport:
    """A host's report for one record: applied ``generation``, or failed with ``error``."""

    record_id: int
    generation: int
    error: str | None = None


def _needed_by(session: Session, accounts: set[str]) -> dict[str, tuple[str, ...]]:
    """Per account, the hosts that run one of its bound instances (they need its records)."""
    if not accounts:
        return {}
    rows = session.execute(
        select(_REC.c.account, _REC.c.host).distinct()
        .where(_REC.c.account.in_(accounts), _REC.c.state == State.BOUND.value)
    )
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r.account, []).append(r.host)
    return {a: tuple(sorted(h)) for a, h in out.items()}


def list_records(
    session: Session, *, account: str | None = None, host: str | None = None,
) -> list[RecordStatus]:
    """Records (of one account / on one host) with the generation each host applied."""
    stmt = select(_REC).order_by(_REC.c.id)
    if account is not None:
        stmt = stmt.where(_REC.c.account == account)
    if host is not None:
        stmt = stmt.where(_REC.c.host == host)
    rows = session.execute(stmt).all()
    applied: dict[int, list[AppliedState]] = {}
    if rows:
        for a in session.execute(
            select(_APPLIED).where(_APPLIED.c.record_id.in_([r.id for r in rows]))
            .order_by(_APPLIED.c.host)
        ):
            applied.setdefault(a.record_id, []).append(
                AppliedState(host=a.host, generation=a.generation, error=a.error, at=a.at)
            )
    needed = _needed_by(session, {r.account for r in rows})
    return [
        RecordStatus(
            record=record_view(r),
            needed_by=needed.get(r.account, ()) if r.state == State.BOUND.value else (),
            applied=tuple(applied.get(r.id, ())),
        )
        for r in rows
    ]


def records_for_host(session: Session, *, host: str) -> list[AddressRecord]:
    """What ``host`` must translate: bound records of every account with an instance there.

    An agent rebuilds its tables from this list (not from memory) after a restart.
    """
    accounts = select(_REC.c.account).where(
        _REC.c.host == host, _REC.c.state == State.BOUND.value
    )
    rows = session.execute(
        select(_REC)
        .where(_REC.c.account.in_(accounts), _REC.c.state == State.BOUND.value)
        .order_by(_REC.c.id)
    )
    return [record_view(r) for r in rows]


# --- host reports -----------------------------------------------------------------------


def report_applied(
    session: Session, *, host: str, reports: Iterable[AppliedReport],
    now: datetime | None = None,
) -> None:
    """Store what ``host`` applied. A failure keeps the last good generation and the error.

    Reports for records that are gone are ignored (a release raced the report); a
    generation above the record's is refused: the host cannot have applied it.
    """
    now = utcnow(now)
    for rep in reports:
        cur = session.execute(
            select(_REC.c.generation).where(_REC.c.id == rep.record_id)
        ).scalar_one_or_none()
        if cur is None:
            continue
        if rep.generation > cur:
            raise RequestError(
                f"host {host!r} reports generation {rep.generation} of record "
                f"{rep.record_id}, which is only at {cur}"
            )
        old = session.execute(
            select(_APPLIED).where(_APPLIED.c.record_id == rep.record_id,
                                   _APPLIED.c.host == host)
        ).one_or_none()
        if rep.error is not None:
            values = {"generation": old.generation if old else 0, "error": rep.error, "at": now}
        else:
            values = {"generation": rep.generation, "error": None, "at": now}
        if old is None:
            session.execute(insert(_APPLIED).values(record_id=rep.record_id, host=host,
                                                    **values))
        else:
            session.execute(
                update(_APPLIED)
                .where(_APPLIED.c.record_id == rep.record_id, _APPLIED.c.host == host)
                .values(**values)
            )


def report_instances(
    session: Session, *, host: str, instances: Iterable[str], now: datetime | None = None,
) -> list[AddressRecord]:
    """``host`` reports the instances it runs; bound records there whose instance is not
    among them become leak suspects (first-seen time and generation noted). Returns them.
    Not a transition: no generation change, no history row.
    """
    now = utcnow(now)
    present = set(instances)
    rows = session.execute(
        select(_REC).where(_REC.c.host == host, _REC.c.state == State.BOUND.value)
    ).all()
    suspects = []
    for r in rows:
        if r.instance in present:
            if r.missing_since is not None:
                session.execute(
                    update(_REC).where(_REC.c.id == r.id)
                    .values(missing_since=None, missing_generation=None)
                )
            continue
        if r.missing_since is None or r.missing_generation != r.generation:
            session.execute(
                update(_REC).where(_REC.c.id == r.id, _REC.c.generation == r.generation)
                .values(missing_since=now, missing_generation=r.generation)
            )
        suspects.append(record_view(r))
    return suspects


def collect_leaks(
    session: Session, *, grace_s: float | None = None, hold_down_s: float | None = None,
    settings: IpamSettings | None = None, now: datetime | None = None,
) -> list[AddressRecord]:
    """Release bound records whose instance has been reported missing for ``grace_s``.

    Safe by construction: only a record whose generation is still the one seen when its
    instance went missing (any bind, move or claim since cancels it), and only through a
    compare-and-set on that generation, so a record re-bound meanwhile is never freed.
    """
    now = utcnow(now)
    settings = settings or IpamSettings()
    grace = settings.leak_grace_s if grace_s is None else grace_s
    rows = session.execute(
        select(_REC).where(
            _REC.c.state == State.BOUND.value,
            _REC.c.missing_since.is_not(None),
            _REC.c.missing_since <= now - timedelta(seconds=grace),
            _REC.c.missing_generation == _REC.c.generation,
        ).with_for_update(skip_locked=True)
    ).all()
    hold = settings.hold_down_s if hold_down_s is None else hold_down_s
    out = []
    for row in rows:
        free_physical(session, row.physical_pool_id, row.physical)
        rec = transition(
            session, row, Event.LEAK, now, row.missing_generation, instance=None, host=None,
            physical_pool_id=None, physical=None, held_until=now + timedelta(seconds=hold),
        )
        out.append(rec)
    return out
