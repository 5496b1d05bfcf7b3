"""Address records in the store: the lifecycle operations, history and host reports.

Every function works inside the caller's transaction on a SQLAlchemy ``Session`` and never
commits; the caller wraps one operation in ``with session.begin():`` so an error rolls
everything back (nothing changed). Checks run before writes wherever possible.

Concurrency: taking an address is one atomic cursor statement or a free-list pop (see
:mod:`edgevisor.network.pools`), and the record is inserted with ``ON CONFLICT DO NOTHING``
against the unique constraints, so two transactions never hold one address. Record
updates are compare-and-set on ``generation``; a lost race raises
:class:`~edgevisor.errors.Conflict` ("retry"). On SQLite use
:func:`~edgevisor.network.pools.configure_sqlite` (``BEGIN IMMEDIATE``).

The state machine is :mod:`edgevisor.network.lifecycle`; every transition appends exactly
one history row in the same transaction.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, Table, delete, func, insert, select, update
from sqlalchemy.orm import Session

from edgevisor.errors import Conflict, Forbidden, NotFound, RequestError
from edgevisor.network.ipam import AddressPool, IpamSettings
from edgevisor.network.lifecycle import Event, State, next_state
from edgevisor.network.pools import (
    CAS_RETRIES,
    NET,
    NFREE,
    REC,
    TAKE_NET_CURSOR,
    NetworkInfo,
    PhysicalPoolInfo,
    Retry,
    allocate_physical,
    canonical,
    configure_sqlite,
    create_network,
    create_physical_pool,
    delete_network,
    free_physical,
    get_network,
    insert_ignore,
    list_networks,
    list_physical_pools,
    net_pool,
    network_row,
    pop_free,
    rowcount,
    utcnow,
)
from edgevisor.store.network_models import AddressHistory, HostApplied

__all__ = [
    "AddressRecord",
    "HistoryEntry",
    "NetworkInfo",
    "PhysicalPoolInfo",
    "RecordRef",
    "allocate",
    "bind",
    "claim",
    "configure_sqlite",
    "create_network",
    "create_physical_pool",
    "delete_network",
    "expire_holds",
    "get_network",
    "get_record",
    "history",
    "list_networks",
    "list_physical_pools",
    "move",
    "move_from",
    "preserve",
    "release",
]

_HIST: Table = AddressHistory.__table__  # type: ignore[assignment]
_APPLIED: Table = HostApplied.__table__  # type: ignore[assignment]
_REC = REC
_NET = NET
_NFREE = NFREE
_INS_HIST = insert(_HIST)
_CAS_RETRIES = CAS_RETRIES
_Retry = Retry

#: A record named by its id, or by its logical address within the caller's account.
RecordRef = int | str


@dataclass(frozen=True)
class AddressRecord:
    id: int
    account: str
    network_id: int
    logical: str
    physical: str | None
    host: str | None
    instance: str | None
    state: State
    generation: int
    held_until: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    record_id: int
    account: str
    address: str
    event: Event
    from_state: State | None
    to_state: State
    instance: str | None
    host: str | None
    physical: str | None
    generation: int
    at: datetime


def record_view(row: Row[Any]) -> AddressRecord:
    return AddressRecord(
        id=row.id, account=row.account, network_id=row.network_id, logical=row.logical,
        physical=row.physical, host=row.host, instance=row.instance, state=State(row.state),
        generation=row.generation, held_until=row.held_until, created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _history(
    session: Session | Connection, rec: Row[Any] | AddressRecord, ev: Event,
    frm: State | None, to: State, generation: int, now: datetime, **fields: Any,
) -> None:
    values = {
        "record_id": rec.id, "account": rec.account, "network_id": rec.network_id,
        "address": rec.logical, "event": ev.value, "from_state": frm.value if frm else None,
        "to_state": to.value, "instance": rec.instance, "host": rec.host,
        "physical": rec.physical, "generation": generation, "at": now,
    }
    values.update(fields)
    conn = session.connection() if isinstance(session, Session) else session
    conn.execute(_INS_HIST, values)


# --- allocation --------------------------------------------------------------------------


def allocate(
    session: Session, *, account: str, network: str, address: str | None = None,
    now: datetime | None = None,
) -> AddressRecord:
    """Allocate any free address of ``network`` (or exactly ``address``) to ``account``.

    Any: a fresh address from the cursor (one atomic statement), else the free-list's
    oldest, else one whose hold-down is over; PoolExhausted names the pool and its size.
    """
    now = utcnow(now)
    if address is None:
        got = _take_cursor(session, account, network, now)
        if got is not None:
            return got
    for _ in range(_CAS_RETRIES):
        net = network_row(session, account, network, lock=True)
        pool = net_pool(net)
        try:
            if address is not None:
                return _allocate_specific(session, net, pool, address, now)
            got = _allocate_from_free_list(session, net, now)
        except _Retry:
            continue
        if got is not None:
            return got
        in_use = session.execute(
            select(func.count()).select_from(_REC).where(_REC.c.network_id == net.id)
        ).scalar_one()
        raise pool.exhausted(in_use)
    raise Conflict(f"network {network!r} of account {account!r} is contended; retry")


def _take_cursor(
    session: Session, account: str, network: str, now: datetime
) -> AddressRecord | None:
    """Fresh addresses first. An offset taken meanwhile by a specific request is skipped
    (each such offset once: amortised O(1)); reserved ones at most three times."""
    conn = session.connection()
    params = {"b_account": account, "b_name": network}
    while True:
        net = conn.execute(TAKE_NET_CURSOR, params).first()
        if net is None:
            return None  # cursor at its end (or no such network: the caller says which)
        pool = net_pool(net)
        offset = net.next_offset - 1
        if offset in pool.reserved:
            continue
        rec = _new_record(session, net, str(pool.address_at(offset)), now)
        if rec is not None:
            return rec


def _new_record(
    session: Session, net: Row[Any], logical: str, now: datetime
) -> AddressRecord | None:
    values = {
        "account": net.account, "network_id": net.id, "logical": logical,
        "state": State.ALLOCATED.value, "generation": 1, "created_at": now, "updated_at": now,
    }
    conn = session.connection()
    rid = insert_ignore(session, _REC, values, conn=conn)
    if rid is None:
        return None
    rec = AddressRecord(
        id=rid, account=net.account, network_id=net.id, logical=logical, physical=None,
        host=None, instance=None, state=State.ALLOCATED, generation=1, held_until=None,
        created_at=now, updated_at=now,
    )
    _history(conn, rec, Event.ALLOCATE, None, State.ALLOCATED, 1, now)
    return rec


def _allocate_from_free_list(
    session: Session, net: Row[Any], now: datetime
) -> AddressRecord | None:
    """The free-list, oldest first; when it is empty, end one expired hold and retry."""
    while True:
        addr = pop_free(session, _NFREE, "network_id", net.id)
        if addr is None:
            if _expire_some(session, now, network_id=net.id, limit=1) == 0:
                return None
            continue
        rec = _new_record(session, net, addr, now)
        if rec is not None:
            return rec


def _allocate_specific(
    session: Session, net: Row[Any], pool: AddressPool, address: str, now: datetime
) -> AddressRecord:
    offset = pool.offset_of(address)
    pool.check_assignable(offset)
    logical = str(pool.address_at(offset))
    existing = session.execute(
        select(_REC.c.id, _REC.c.state, _REC.c.held_until)
        .where(_REC.c.account == net.account, _REC.c.logical == logical)
    ).first()
    if existing is not None:
        if existing.state == State.HELD.value and existing.held_until <= now:
            _expire_some(session, now, record_id=existing.id, limit=1)
        else:
            extra = (f" until {existing.held_until.isoformat()}"
                     if existing.state == State.HELD.value else "")
            raise Conflict(
                f"address {logical} of network {net.name!r} is already taken "
                f"(record {existing.id}, state {existing.state}{extra})"
            )
    # Below the cursor a free address is on the free-list; above it, the cursor will skip
    # it when it gets there (the insert below then finds the unique key taken).
    session.execute(
        delete(_NFREE).where(_NFREE.c.network_id == net.id, _NFREE.c.address == logical)
    )
    rec = _new_record(session, net, logical, now)
    if rec is None:
        raise _Retry
    return rec


# --- transitions of existing records -----------------------------------------------------


def _load(
    session: Session, account: str | None, ref: RecordRef, *, lock: bool = True
) -> Row[Any]:
    if isinstance(ref, int):
        stmt = select(_REC).where(_REC.c.id == ref)
        what = f"record {ref}"
    else:
        if account is None:
            raise RequestError("an address needs an account to name it; pass a record id")
        stmt = select(_REC).where(_REC.c.account == account, _REC.c.logical == canonical(ref))
        what = f"address {canonical(ref)} of account {account!r}"
    if lock:
        stmt = stmt.with_for_update()
    row = session.execute(stmt).one_or_none()
    if row is None:
        raise NotFound(f"{what} not found (never allocated, or released)")
    if account is not None and row.account != account:
        raise Forbidden(f"{what} is not owned by account {account!r}")
    return row


def transition(
    session: Session, row: Row[Any], ev: Event, now: datetime,
    expected_generation: int | None, **values: Any,
) -> AddressRecord:
    frm = State(row.state)
    to = next_state(frm, ev, what=f"address {row.logical}")
    if expected_generation is not None and expected_generation != row.generation:
        raise Conflict(
            f"address {row.logical} is at generation {row.generation}, "
            f"not {expected_generation}: it changed meanwhile"
        )
    gen = row.generation + 1
    values.update(state=to.value, generation=gen, updated_at=now,
                  missing_since=None, missing_generation=None)
    # One statement: the compare-and-set and the new row (RETURNING: SQLite >= 3.35, PG).
    conn = session.connection()
    new = conn.execute(
        update(_REC)
        .where(_REC.c.id == row.id, _REC.c.generation == row.generation)
        .values(**values)
        .returning(*_REC.c)
    ).first()
    if new is None:
        raise Conflict(f"address {row.logical} changed concurrently; retry")
    _history(conn, new, ev, frm, to, gen, now)
    return record_view(new)


def _check_instance_free(session: Session, instance: str, record_id: int) -> None:
    other = session.execute(
        select(_REC.c.id, _REC.c.logical).where(_REC.c.instance == instance)
    ).first()
    if other is not None and other.id != record_id:
        raise Conflict(f"instance {instance!r} already has address {other.logical}")


def _bind_like(
    session: Session, ev: Event, account: str | None, record: RecordRef, instance: str,
    host: str, host_group: str, expected_generation: int | None, now: datetime | None,
) -> AddressRecord:
    now = utcnow(now)
    row = _load(session, account, record)
    next_state(State(row.state), ev, what=f"address {row.logical}")  # refuse before writing
    _check_instance_free(session, instance, row.id)
    family = ipaddress.ip_address(row.logical).version
    pool_id, physical = allocate_physical(session, host_group, family)
    return transition(
        session, row, ev, now, expected_generation,
        instance=instance, host=host, physical_pool_id=pool_id, physical=physical,
    )


def bind(
    session: Session, *, account: str | None, record: RecordRef, instance: str, host: str,
    host_group: str, expected_generation: int | None = None, now: datetime | None = None,
) -> AddressRecord:
    """allocated → bound: give the address to ``instance`` on ``host`` (new physical)."""
    return _bind_like(session, Event.BIND, account, record, instance, host, host_group,
                      expected_generation, now)


def claim(
    session: Session, *, account: str, record: RecordRef, instance: str, host: str,
    host_group: str, expected_generation: int | None = None, now: datetime | None = None,
) -> AddressRecord:
    """preserved → bound for another instance of the same account (others: Forbidden)."""
    return _bind_like(session, Event.CLAIM, account, record, instance, host, host_group,
                      expected_generation, now)


def preserve(
    session: Session, *, account: str | None, record: RecordRef,
    expected_generation: int | None = None, now: datetime | None = None,
) -> AddressRecord:
    """bound → preserved: the instance stopped; the account keeps the logical address."""
    now = utcnow(now)
    row = _load(session, account, record)
    next_state(State(row.state), Event.PRESERVE, what=f"address {row.logical}")
    free_physical(session, row.physical_pool_id, row.physical)
    return transition(
        session, row, Event.PRESERVE, now, expected_generation,
        instance=None, host=None, physical_pool_id=None, physical=None,
    )


def move(
    session: Session, *, record: RecordRef, host: str, host_group: str,
    account: str | None = None, expected_generation: int | None = None,
    now: datetime | None = None,
) -> AddressRecord:
    """The migration hook: a bound record moves to ``host`` with a new physical address.

    The one ``host`` column changes in one compare-and-set, so the record names exactly
    one host at any time; hosts apply the new generation and drop the old mapping.
    """
    return move_from(session, record=record, host=host, host_group=host_group,
                     account=account, expected_generation=expected_generation, now=now)[1]


def move_from(
    session: Session, *, record: RecordRef, host: str, host_group: str,
    account: str | None = None, expected_generation: int | None = None,
    now: datetime | None = None,
) -> tuple[AddressRecord, AddressRecord]:
    """:func:`move`, returning the record before and after (the caller needs the old
    host for fencing; no second read). Five statements: load, physical cursor, free the
    old physical, compare-and-set, history."""
    now = utcnow(now)
    row = _load(session, account, record)
    next_state(State(row.state), Event.MOVE, what=f"address {row.logical}")
    if row.host == host:
        raise Conflict(f"address {row.logical} is already on host {host!r}")
    if expected_generation is not None and expected_generation != row.generation:
        raise Conflict(
            f"address {row.logical} is at generation {row.generation}, "
            f"not {expected_generation}: it changed meanwhile"
        )
    family = ipaddress.ip_address(row.logical).version
    pool_id, physical = allocate_physical(session, host_group, family)
    free_physical(session, row.physical_pool_id, row.physical)
    return record_view(row), transition(
        session, row, Event.MOVE, now, expected_generation,
        host=host, physical_pool_id=pool_id, physical=physical,
    )


def release(
    session: Session, *, account: str | None, record: RecordRef,
    hold_down_s: float | None = None, settings: IpamSettings | None = None,
    expected_generation: int | None = None, now: datetime | None = None,
) -> AddressRecord:
    """→ held: the address returns to the free pool after the hold-down.

    With a hold-down of 0 it is returned at once (held → released in the same call; two
    history rows, one per transition). A second release is refused (Conflict).
    """
    now = utcnow(now)
    hold = hold_down_s if hold_down_s is not None else (settings or IpamSettings()).hold_down_s
    if hold < 0:
        raise RequestError(f"hold-down must be >= 0 s, not {hold}")
    row = _load(session, account, record)
    next_state(State(row.state), Event.RELEASE, what=f"address {row.logical}")
    free_physical(session, row.physical_pool_id, row.physical)
    rec = transition(
        session, row, Event.RELEASE, now, expected_generation, instance=None, host=None,
        physical_pool_id=None, physical=None, held_until=now + timedelta(seconds=hold),
    )
    if hold == 0:
        _expire_some(session, now, record_id=rec.id, limit=1)
    return rec


def _expire_some(
    session: Session, now: datetime, *, network_id: int | None = None,
    record_id: int | None = None, limit: int = 100,
) -> int:
    """held → released for holds that are over: delete the record, free the address."""
    stmt = (
        select(_REC)
        .where(_REC.c.state == State.HELD.value, _REC.c.held_until <= now)
        .order_by(_REC.c.held_until, _REC.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if network_id is not None:
        stmt = stmt.where(_REC.c.network_id == network_id)
    if record_id is not None:
        stmt = stmt.where(_REC.c.id == record_id)
    done = 0
    for row in session.execute(stmt).all():
        gone = rowcount(
            session,
            delete(_REC).where(_REC.c.id == row.id, _REC.c.generation == row.generation),
        )
        if gone != 1:
            continue
        session.execute(delete(_APPLIED).where(_APPLIED.c.record_id == row.id))
        net = session.execute(select(_NET).where(_NET.c.id == row.network_id)).one()
        pool = net_pool(net)
        # Between cursor and cursor limit the address was a specific request and the
        # cursor will hand it out in turn; anywhere else it goes to the free-list.
        offset = pool.offset_of(row.logical)
        if offset < net.next_offset or offset >= net.cursor_limit:
            session.execute(insert(_NFREE).values(network_id=row.network_id,
                                                  address=row.logical))
        _history(session, row, Event.EXPIRE, State.HELD, State.RELEASED,
                 row.generation + 1, now)
        done += 1
    return done


def expire_holds(session: Session, *, now: datetime | None = None, limit: int = 1000) -> int:
    """Return addresses whose hold-down is over to their free pools; the count returned."""
    return _expire_some(session, utcnow(now), limit=limit)


# --- queries ------------------------------------------------------------------------------


def get_record(session: Session, *, account: str | None, record: RecordRef) -> AddressRecord:
    return record_view(_load(session, account, record, lock=False))


def history(
    session: Session, *, account: str, address: str | None = None,
    record_id: int | None = None,
) -> list[HistoryEntry]:
    """Every transition of an address of ``account`` (or of one record), oldest first.

    Outlives the records: an address released and allocated again shows both lives.
    """
    stmt = select(_HIST).where(_HIST.c.account == account)
    if address is not None:
        stmt = stmt.where(_HIST.c.address == canonical(address))
    if record_id is not None:
        stmt = stmt.where(_HIST.c.record_id == record_id)
    return [
        HistoryEntry(
            id=r.id, record_id=r.record_id, account=r.account, address=r.address,
            event=Event(r.event), from_state=State(r.from_state) if r.from_state else None,
            to_state=State(r.to_state), instance=r.instance, host=r.host,
            physical=r.physical, generation=r.generation, at=r.at,
        )
        for r in session.execute(stmt.order_by(_HIST.c.id))
    ]
