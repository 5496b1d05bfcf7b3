"""Networks and physical pools in the store, and their persisted O(1) allocation state.

The algorithm is :mod:`edgevisor.network.ipam` (cursor + FIFO free-list), kept in tables:
a ``next_offset`` cursor column on the network or pool and a free-list table. Taking the
cursor is one statement, ``UPDATE ... SET next_offset = next_offset + 1 WHERE ... AND
next_offset < cursor_limit RETURNING ...``: atomic under the row lock on PostgreSQL and
under SQLite's single writer, and O(1) in the pool size on both. The free-list is popped
oldest-first by ``DELETE`` of one row with a row-count check (a compare-and-set).

Functions here run inside the caller's transaction (see :mod:`edgevisor.network.records`).
Public names outside ``__all__`` are helpers shared with records.py only.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    Row,
    Table,
    bindparam,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgevisor.errors import AlreadyExists, Conflict, NotFound, RequestError
from edgevisor.network.ipam import (
    FIRST_HOST,
    AddressPool,
    IpamSettings,
    IpNetwork,
    parse_network,
)
from edgevisor.network.lifecycle import Event, State, next_state
from edgevisor.store.network_models import (
    AddressHistory,
    AddressRecordRow,
    HostApplied,
    Network,
    NetworkFreeAddress,
    PhysicalFreeAddress,
    PhysicalPool,
)

__all__ = [
    "HOLDING_STATES",
    "NetworkInfo",
    "PhysicalPoolInfo",
    "configure_sqlite",
    "create_network",
    "create_physical_pool",
    "delete_account_networks",
    "delete_network",
    "get_network",
    "list_networks",
    "list_physical_pools",
]

NET: Table = Network.__table__  # type: ignore[assignment]
POOL: Table = PhysicalPool.__table__  # type: ignore[assignment]
NFREE: Table = NetworkFreeAddress.__table__  # type: ignore[assignment]
PFREE: Table = PhysicalFreeAddress.__table__  # type: ignore[assignment]
REC: Table = AddressRecordRow.__table__  # type: ignore[assignment]
HIST: Table = AddressHistory.__table__  # type: ignore[assignment]
APPLIED: Table = HostApplied.__table__  # type: ignore[assignment]

#: Cursors stop here even in larger pools (an IPv6 /64): far beyond any allocation count.
CURSOR_CAP = 2**62
#: Record states in which the account holds the address (deleting it is refused).
HOLDING_STATES = (State.ALLOCATED.value, State.BOUND.value, State.PRESERVED.value)
CAS_RETRIES = 20


class Retry(Exception):
    """A compare-and-set lost a race; re-read and try again."""


@dataclass(frozen=True)
class NetworkInfo:
    id: int
    account: str
    name: str
    cidr: str
    family: int
    gateway: str | None
    size: int
    assignable: int


@dataclass(frozen=True)
class PhysicalPoolInfo:
    id: int
    host_group: str
    cidr: str
    family: int
    gateway: str | None
    size: int
    assignable: int


# --- engine setup ----------------------------------------------------------------------


def configure_sqlite(engine: Engine, *, busy_timeout_ms: int = 30_000) -> None:
    """WAL, a busy timeout, foreign keys and ``BEGIN IMMEDIATE`` on a SQLite engine.

    pysqlite's default opens a transaction only before a write, so a read-then-write is not
    atomic; ``BEGIN IMMEDIATE`` takes the write lock up front (the documented SQLAlchemy
    recipe). No-op for other dialects.
    """
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# --- shared helpers ----------------------------------------------------------------------


def utcnow(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now


def canonical(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip()))
    except ValueError as exc:
        raise RequestError(f"invalid address {address!r}: {exc}") from exc


@functools.lru_cache(maxsize=1024)
def _pool(cidr: str, gateway: str | None, reserve_edges: bool, name: str) -> AddressPool:
    return AddressPool.create(cidr, gateway=gateway, reserve_edges=reserve_edges, name=name)


def pool_for(cidr: str, gateway: str | None, reserve_edges: bool, name: str) -> AddressPool:
    """The (cached) :class:`AddressPool` of a network or pool row's columns."""
    return _pool(cidr, gateway, reserve_edges, name)


def net_pool(row: Row[Any]) -> AddressPool:
    return _pool(row.cidr, row.gateway, row.reserve_edges, f"{row.account}/{row.name}")


def phys_pool(row: Row[Any]) -> AddressPool:
    return _pool(row.cidr, row.gateway, row.reserve_edges, f"physical:{row.host_group}")


@functools.lru_cache(maxsize=32)
def _insert_ignore_stmt(dialect: str, table: Table) -> Any:
    ins = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
    return ins.on_conflict_do_nothing().returning(table.c.id)


def insert_ignore(
    session: Session, table: Table, values: dict[str, Any], *, conn: Connection | None = None
) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id; None if a unique key was taken."""
    conn = conn if conn is not None else session.connection()
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        got = conn.execute(_insert_ignore_stmt(dialect, table), values).scalar_one_or_none()
        return None if got is None else int(got)
    try:  # other dialects: a savepoint per attempt
        with session.begin_nested():
            res = cast(CursorResult[Any], session.execute(insert(table).values(**values)))
            key = res.inserted_primary_key
            assert key is not None
            return int(key[0])
    except IntegrityError:
        return None


def rowcount(session: Session, stmt: Any, params: dict[str, Any] | None = None) -> int:
    return cast(CursorResult[Any], session.connection().execute(stmt, params)).rowcount


def _lock_key(session: Session, key: str) -> None:
    """Serialise overlap checks for one key on PostgreSQL (SQLite serialises writers)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))


def _check_overlap(existing: Iterable[str], net: IpNetwork, what: str) -> None:
    for cidr in existing:
        other = ipaddress.ip_network(cidr)
        if other.version == net.version and other.overlaps(net):
            raise Conflict(f"{what} {net} overlaps {other}")


# --- networks ----------------------------------------------------------------------------

_SEL_NET = select(NET).where(NET.c.account == bindparam("b_account"),
                             NET.c.name == bindparam("b_name"))
_SEL_NET_LOCK = _SEL_NET.with_for_update()
# Take the cursor: one statement, atomic, O(1); no row when exhausted (or no network).
TAKE_NET_CURSOR = (
    update(NET)
    .where(NET.c.account == bindparam("b_account"), NET.c.name == bindparam("b_name"),
           NET.c.next_offset < NET.c.cursor_limit)
    .values(next_offset=NET.c.next_offset + 1)
    .returning(*NET.c)
)


def network_info(row: Row[Any]) -> NetworkInfo:
    pool = net_pool(row)
    return NetworkInfo(
        id=row.id, account=row.account, name=row.name, cidr=row.cidr, family=row.family,
        gateway=row.gateway or None, size=pool.size, assignable=pool.assignable,
    )


def network_row(session: Session, account: str, name: str, *, lock: bool = False) -> Row[Any]:
    row = session.connection().execute(
        _SEL_NET_LOCK if lock else _SEL_NET, {"b_account": account, "b_name": name}
    ).one_or_none()
    if row is None:
        raise NotFound(f"account {account!r} has no network named {name!r}")
    return row


def create_network(
    session: Session, *, account: str, name: str, cidr: str,
    gateway: str | None = FIRST_HOST, reserve_edges: bool = True,
    settings: IpamSettings | None = None, now: datetime | None = None,
) -> NetworkInfo:
    """Create an account's network; overlapping another of the same account is refused.

    ``gateway``: ``"first"`` (the first host address), ``None``, or an address inside.
    """
    net = parse_network(cidr, settings or IpamSettings())
    pool = AddressPool.create(net, gateway=gateway, reserve_edges=reserve_edges)
    if not name or len(name) > 64:
        raise RequestError(f"network name {name!r}: 1 to 64 characters")
    _lock_key(session, f"edgevisor.networks/{account}")
    if session.execute(
        select(NET.c.id).where(NET.c.account == account, NET.c.name == name)
    ).first():
        raise AlreadyExists(f"account {account!r} already has a network named {name!r}")
    existing = session.execute(select(NET.c.cidr).where(NET.c.account == account)).scalars()
    _check_overlap(existing, net, f"network {name!r}:")
    nid = session.execute(
        insert(NET).values(
            account=account, name=name, cidr=str(net), family=net.version,
            gateway=str(pool.gateway) if pool.gateway else None, reserve_edges=reserve_edges,
            next_offset=0, cursor_limit=min(pool.size, CURSOR_CAP), created_at=utcnow(now),
        ).returning(NET.c.id)
    ).scalar_one()
    return network_info(session.execute(select(NET).where(NET.c.id == nid)).one())


def get_network(session: Session, *, account: str, name: str) -> NetworkInfo:
    return network_info(network_row(session, account, name))


def list_networks(session: Session, *, account: str) -> list[NetworkInfo]:
    rows = session.execute(select(NET).where(NET.c.account == account).order_by(NET.c.name))
    return [network_info(r) for r in rows]


def delete_network(session: Session, *, account: str, name: str) -> None:
    """Delete a network with no records; Conflict while any address of it exists."""
    row = network_row(session, account, name, lock=True)
    count = session.execute(
        select(func.count()).select_from(REC).where(REC.c.network_id == row.id)
    ).scalar_one()
    if count:
        raise Conflict(
            f"network {name!r} of account {account!r} still has {count} address(es); "
            "release them first"
        )
    session.execute(delete(NFREE).where(NFREE.c.network_id == row.id))
    session.execute(delete(NET).where(NET.c.id == row.id))


def delete_account_networks(
    session: Session, *, account: str, now: datetime | None = None
) -> list[str]:
    """Delete every network of ``account`` (account deletion); the names deleted.

    Conflict, nothing changed, while the account holds an address (allocated, bound or
    preserved). Addresses in their hold-down (released, state held) do not block: with the
    account's instances gone nobody can still be using them, so their holds end here, each
    with one history row (``account_deleted``, held -> released) like any other end of a
    hold. The free-lists go with their networks; the history stays (it has no foreign keys
    and outlives addresses by design).

    Race-free against allocations in other transactions: the first statement writes the
    account's network rows, which takes SQLite's one write lock, and on PostgreSQL locks
    those rows, which every allocation (cursor ``UPDATE`` or ``FOR UPDATE``) also takes;
    the check below then sees every record committed before.
    """
    now = utcnow(now)
    session.execute(
        update(NET).where(NET.c.account == account).values(next_offset=NET.c.next_offset)
    )
    nets = {r.id: r.name for r in session.execute(
        select(NET.c.id, NET.c.name).where(NET.c.account == account)
    )}
    held = session.execute(
        select(REC.c.logical).where(
            REC.c.account == account, REC.c.state.in_(HOLDING_STATES)
        ).order_by(REC.c.logical)
    ).scalars().all()
    if held:
        raise Conflict(
            f"account {account!r} still holds address(es) {', '.join(held)}; "
            "release them first",
            details={"addresses": list(held)},
        )
    # Only held (hold-down) records are left; any network of the account (or none).
    rows = session.execute(select(REC).where(REC.c.account == account)).all()
    for row in rows:
        to = next_state(State(row.state), Event.ACCOUNT_DELETED)
        session.execute(delete(APPLIED).where(APPLIED.c.record_id == row.id))
        session.execute(delete(REC).where(REC.c.id == row.id))
        session.execute(insert(HIST).values(
            record_id=row.id, account=row.account, network_id=row.network_id,
            address=row.logical, event=Event.ACCOUNT_DELETED.value, from_state=row.state,
            to_state=to.value, instance=None, host=None, physical=None,
            generation=row.generation + 1, at=now,
        ))
    if nets:
        session.execute(delete(NFREE).where(NFREE.c.network_id.in_(nets)))
        session.execute(delete(NET).where(NET.c.id.in_(nets)))
    return sorted(nets.values())


# --- physical pools ------------------------------------------------------------------------

_SEL_POOL_LOCK = select(POOL).where(
    POOL.c.host_group == bindparam("b_group"), POOL.c.family == bindparam("b_family")
).with_for_update()
_TAKE_POOL_CURSOR = (
    update(POOL)
    .where(POOL.c.host_group == bindparam("b_group"), POOL.c.family == bindparam("b_family"),
           POOL.c.next_offset < POOL.c.cursor_limit)
    .values(next_offset=POOL.c.next_offset + 1)
    .returning(*POOL.c)
)


def _pool_info(row: Row[Any]) -> PhysicalPoolInfo:
    pool = phys_pool(row)
    return PhysicalPoolInfo(
        id=row.id, host_group=row.host_group, cidr=row.cidr, family=row.family,
        gateway=row.gateway or None, size=pool.size, assignable=pool.assignable,
    )


def create_physical_pool(
    session: Session, *, host_group: str, cidr: str, gateway: str | None = None,
    reserve_edges: bool = True, now: datetime | None = None,
) -> PhysicalPoolInfo:
    """The physical address pool of a host group (one per family); pools must not overlap."""
    net = parse_network(cidr)
    pool = AddressPool.create(net, gateway=gateway, reserve_edges=reserve_edges)
    _lock_key(session, "edgevisor.physical_pools")
    if session.execute(
        select(POOL.c.id).where(POOL.c.host_group == host_group, POOL.c.family == net.version)
    ).first():
        raise AlreadyExists(f"host group {host_group!r} already has an IPv{net.version} pool")
    _check_overlap(session.execute(select(POOL.c.cidr)).scalars(), net, "physical pool")
    pid = session.execute(
        insert(POOL).values(
            host_group=host_group, cidr=str(net), family=net.version,
            gateway=str(pool.gateway) if pool.gateway else None, reserve_edges=reserve_edges,
            next_offset=0, cursor_limit=min(pool.size, CURSOR_CAP), created_at=utcnow(now),
        ).returning(POOL.c.id)
    ).scalar_one()
    return _pool_info(session.execute(select(POOL).where(POOL.c.id == pid)).one())


def list_physical_pools(session: Session) -> list[PhysicalPoolInfo]:
    rows = session.execute(select(POOL).order_by(POOL.c.host_group, POOL.c.family))
    return [_pool_info(r) for r in rows]


# --- free-lists ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _pop_free_stmts(table: Table, fk: str) -> tuple[Any, Any]:
    sel = (
        select(table.c.id, table.c.address)
        .where(table.c[fk] == bindparam("b_owner"))
        .order_by(table.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return sel, delete(table).where(table.c.id == bindparam("b_id"))


def pop_free(session: Session, table: Table, fk: str, owner_id: int) -> str | None:
    """Take the oldest free-list entry (compare-and-set by delete); None if empty."""
    sel, dele = _pop_free_stmts(table, fk)
    got = session.connection().execute(sel, {"b_owner": owner_id}).first()
    if got is None:
        return None
    if rowcount(session, dele, {"b_id": got.id}) != 1:
        raise Retry
    return str(got.address)


def allocate_physical(session: Session, host_group: str, family: int) -> tuple[int, str]:
    """A physical address from ``host_group``'s pool: ``(pool_id, address)``.

    No specific requests exist for physical addresses, so the cursor never meets a taken
    one; the unique index on records is the safety net.
    """
    params = {"b_group": host_group, "b_family": family}
    conn = session.connection()
    for _ in range(CAS_RETRIES):
        row = conn.execute(_TAKE_POOL_CURSOR, params).first()
        if row is not None:
            offset = row.next_offset - 1
            pool = phys_pool(row)
            if offset in pool.reserved:
                continue
            return row.id, str(pool.address_at(offset))
        row = conn.execute(_SEL_POOL_LOCK, params).first()
        if row is None:
            # Translation is 1:1 within one family (IPv6 over an IPv4-only fabric would
            # need encapsulation or NAT64, not a map lookup): refuse, and say what to add.
            raise NotFound(
                f"host group {host_group!r} has no IPv{family} physical pool: IPv{family} "
                f"logical addresses translate 1:1 to IPv{family} physical addresses only; "
                f"an admin adds one with `edgevisor network pool-create CIDR --host-group "
                f"{host_group}` (POST /v1/physical-pools)"
            )
        try:
            addr = pop_free(session, PFREE, "pool_id", row.id)
        except Retry:
            continue
        if addr is not None:
            return row.id, addr
        in_use = session.execute(
            select(func.count()).select_from(REC).where(REC.c.physical_pool_id == row.id)
        ).scalar_one()
        raise phys_pool(row).exhausted(in_use)
    raise Conflict(f"physical pool of {host_group!r} is contended; retry")


def free_physical(session: Session, pool_id: int | None, address: str | None) -> None:
    if pool_id is not None and address is not None:
        session.execute(insert(PFREE).values(pool_id=pool_id, address=address))
