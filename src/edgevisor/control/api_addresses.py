"""Preserved logical addresses: networks, physical pools, addresses, records, host reports.

Account scoping as in :mod:`.api_accounts`: an account token acts on its own account
(naming another gives 404, so names do not leak); the admin names the account. Claiming
another account's address by record id is refused (403). Every change runs in one store
transaction (an error leaves nothing changed), appends its history row and an event, and
is then pushed to the hosts that need it (see :mod:`.addr_sync`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edgevisor.control import addr_sync
from edgevisor.control.addr_move import Busy
from edgevisor.control.addr_sync import (
    Push,
    ensure_default_pool,
    event_data,
    net_store,
    push,
    push_change,
    record_out,
    record_ref,
    stage_change,
)
from edgevisor.control.auth import Principal, require_host, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import Forbidden, NotFound, RequestError
from edgevisor.network import host_reports, records
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import REC
from edgevisor.network.records import AddressRecord
from edgevisor.sdk import addresses as w
from edgevisor.store import repos
from edgevisor.store.models import Account, Event, Host

__all__ = ["router"]

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
HostAuth = Annotated[str, Depends(require_host)]
AccountQ = Annotated[str | None, Query(description="Account (admin token only).")]


def _account(s: Session, p: Principal, given: str | None) -> Account:
    """The account a request acts on: the token's own, or the one the admin names."""
    if p.admin:
        if not given:
            raise RequestError("the admin token must name the account (account=...)")
        return repos.get_account(s, given)
    acct = s.get(Account, p.account_id)
    if acct is None or (given is not None and given != acct.name):
        raise NotFound(f"account {given!r} not found")
    return acct


def _network_out(n: records.NetworkInfo) -> w.Network:
    return w.Network(account=n.account, name=n.name, cidr=n.cidr, family=n.family,
                     gateway=n.gateway, size=n.size, assignable=n.assignable)


_EVENTS: Table = Event.__table__  # type: ignore[assignment]


async def _run(
    st: ControllerState, fn: Callable[[Session], Any],
    fast: Callable[[bool], Any] | None = None,
) -> Any:
    """``fn`` in one store transaction, in a worker thread.

    ``fast``, if given, is a hot path tried first: on the event loop with ``wait=False``
    (it raises :class:`~edgevisor.control.addr_move.Busy` rather than wait for a lock;
    then it runs in the thread with ``wait=True``); it returns None when ``fn`` must
    serve the call (it changed nothing then).
    """
    again = False
    if fast is not None:
        try:
            got = fast(False)
        except Busy:
            again = True
        else:
            if got is not None:
                return got

    def work() -> Any:
        if again:
            assert fast is not None
            done = fast(True)
            if done is not None:
                return done
        with net_store(st).session() as s:
            return fn(s)

    return await run_in_threadpool(work)


# --- networks and physical pools ----------------------------------------------------------


@router.post("/networks", response_model=w.Network, status_code=201)
async def create_network(body: w.NetworkCreate, p: Auth, request: Request) -> w.Network:
    st = state_of(request)

    def fn(s: Session) -> w.Network:
        acct = _account(s, p, body.account)
        info = records.create_network(s, account=acct.name, name=body.name, cidr=body.cidr,
                                      gateway=body.gateway, settings=st.settings.network.ipam())
        repos.add_event(s, "network.created", st.clock(), subject=body.name,
                        account_id=acct.id, data={"cidr": info.cidr})
        return _network_out(info)

    out: w.Network = await _run(st, fn)
    return out


@router.get("/networks", response_model=list[w.Network])
async def list_networks(p: Auth, request: Request, account: AccountQ = None) -> list[w.Network]:
    st = state_of(request)

    def fn(s: Session) -> list[w.Network]:
        acct = _account(s, p, account)
        return [_network_out(n) for n in records.list_networks(s, account=acct.name)]

    out: list[w.Network] = await _run(st, fn)
    return out


@router.delete("/networks/{name}", status_code=204)
async def delete_network(name: str, p: Auth, request: Request, account: AccountQ = None) -> None:
    st = state_of(request)

    def fn(s: Session) -> None:
        acct = _account(s, p, account)
        records.delete_network(s, account=acct.name, name=name)
        repos.add_event(s, "network.deleted", st.clock(), subject=name, account_id=acct.id)

    await _run(st, fn)


def _pool_out(x: records.PhysicalPoolInfo) -> w.PhysicalPool:
    return w.PhysicalPool(host_group=x.host_group, cidr=x.cidr, family=x.family,
                          gateway=x.gateway, size=x.size, assignable=x.assignable)


@router.post("/physical-pools", response_model=w.PhysicalPool, status_code=201)
async def create_physical_pool(
    body: w.PhysicalPoolCreate, p: Auth, request: Request
) -> w.PhysicalPool:
    p.require_admin()
    st = state_of(request)

    def fn(s: Session) -> w.PhysicalPool:
        info = records.create_physical_pool(s, host_group=body.host_group, cidr=body.cidr,
                                            gateway=body.gateway)
        repos.add_event(s, "physical_pool.created", st.clock(), subject=body.host_group,
                        data={"cidr": info.cidr})
        return _pool_out(info)

    out: w.PhysicalPool = await _run(st, fn)
    return out


@router.get("/physical-pools", response_model=list[w.PhysicalPool])
async def list_physical_pools(p: Auth, request: Request) -> list[w.PhysicalPool]:
    p.require_admin()
    out: list[w.PhysicalPool] = await _run(
        state_of(request), lambda s: [_pool_out(x) for x in records.list_physical_pools(s)]
    )
    return out


# --- address lifecycle --------------------------------------------------------------------


def _scoped_load(s: Session, acct: Account, ref: records.RecordRef, *, claim: bool) -> None:
    """Refuse another account's record given by id: 403 for a claim, else 404."""
    _scoped_ref(s, acct.name, ref, claim=claim)


def _scoped_ref(s: Session, account: str, ref: records.RecordRef, *, claim: bool) -> None:
    if isinstance(ref, int):
        owner = s.execute(select(REC.c.account).where(REC.c.id == ref)).scalar_one_or_none()
        if owner is not None and owner != account:
            if claim:
                raise Forbidden(f"record {ref} belongs to another account; it cannot be "
                                f"claimed by account {account!r}")
            raise NotFound(f"record {ref} not found")


async def _change(
    request: Request, p: Principal, account: str | None, ref: str | None, kind: str,
    op: Callable[[Session, Account, records.RecordRef | None], AddressRecord],
    *, claim: bool = False,
) -> w.AddressRecord:
    st = state_of(request)

    def fn(s: Session) -> Push | None:
        acct = _account(s, p, account)
        rref = record_ref(ref) if ref is not None else None
        old_host = None
        if rref is not None:
            _scoped_load(s, acct, rref, claim=claim)
            old_host = records.get_record(s, account=acct.name, record=rref).host
        return stage_change(s, st, account=acct.name, account_id=acct.id, kind=kind,
                            op=lambda s: op(s, acct, rref), first=old_host)

    change: Push | None = await _run(st, fn)
    assert change is not None  # every op here returns its record
    await push_change(st, change)
    return record_out(change.record)


@router.post("/addresses", response_model=w.AddressRecord, status_code=201)
async def allocate(body: w.AddressAllocate, p: Auth, request: Request) -> w.AddressRecord:
    def op(s: Session, acct: Account, _r: Any) -> AddressRecord:
        return records.allocate(s, account=acct.name, network=body.network,
                                address=body.address)

    return await _change(request, p, body.account, None, "address.allocated", op)


@router.post("/addresses/{ref}/bind", response_model=w.AddressRecord)
async def bind(ref: str, body: w.AddressBind, p: Auth, request: Request) -> w.AddressRecord:
    st = state_of(request)

    def op(s: Session, acct: Account, r: Any) -> AddressRecord:
        repos.get_host(s, body.host)
        ensure_default_pool(s, st, records.get_record(s, account=acct.name, record=r).logical)
        return records.bind(s, account=acct.name, record=r, instance=body.instance,
                            host=body.host, host_group=st.settings.network.host_group,
                            expected_generation=body.expected_generation)

    return await _change(request, p, body.account, ref, "address.bound", op)


@router.post("/addresses/{ref}/claim", response_model=w.AddressRecord)
async def claim(ref: str, body: w.AddressBind, p: Auth, request: Request) -> w.AddressRecord:
    st = state_of(request)

    def op(s: Session, acct: Account, r: Any) -> AddressRecord:
        repos.get_host(s, body.host)
        ensure_default_pool(s, st, records.get_record(s, account=acct.name, record=r).logical)
        return records.claim(s, account=acct.name, record=r, instance=body.instance,
                             host=body.host, host_group=st.settings.network.host_group,
                             expected_generation=body.expected_generation)

    return await _change(request, p, body.account, ref, "address.claimed", op, claim=True)


@router.post("/addresses/{ref}/preserve", response_model=w.AddressRecord)
async def preserve(
    ref: str, body: w.AccountOnly, p: Auth, request: Request
) -> w.AddressRecord:
    def op(s: Session, acct: Account, r: Any) -> AddressRecord:
        return records.preserve(s, account=acct.name, record=r,
                                expected_generation=body.expected_generation)

    return await _change(request, p, body.account, ref, "address.preserved", op)


@router.post("/addresses/{ref}/release", response_model=w.AddressRecord)
async def release(
    ref: str, body: w.AddressRelease, p: Auth, request: Request
) -> w.AddressRecord:
    st = state_of(request)

    def op(s: Session, acct: Account, r: Any) -> AddressRecord:
        return records.release(s, account=acct.name, record=r, hold_down_s=body.hold_down_s,
                               settings=st.settings.network.ipam(),
                               expected_generation=body.expected_generation)

    return await _change(request, p, body.account, ref, "address.released", op)


def _account_id(s: Session, p: Principal, given: str | None) -> tuple[int, str]:
    """:func:`_account` without loading the ORM object: ``(id, name)``."""
    if not p.admin:
        if p.account_id is None or p.account_name is None:
            raise NotFound(f"account {given!r} not found")
        if given is not None and given != p.account_name:
            raise NotFound(f"account {given!r} not found")
        return p.account_id, p.account_name
    if not given:
        raise RequestError("the admin token must name the account (account=...)")
    aid = s.execute(select(Account.id).where(Account.name == given)).scalar()
    if aid is None:
        raise NotFound(f"account {given!r} not found")
    return int(aid), given


@router.post("/addresses/{ref}/move", response_model=w.AddressRecord)
async def move(ref: str, body: w.AddressMove, p: Auth, request: Request) -> Response:
    """The migration hook: the record's one host changes (fencing), with a new physical.

    The remap hot path (``bench/addresses/remap.py``): on SQLite the transaction runs on
    the event loop on a connection of its own (:class:`~.addr_move.FastMover`), falling
    back to :func:`move_txn` (in a thread) for anything out of the common case; then the
    pushes, old host first.
    """
    st = state_of(request)

    def fn(s: Session) -> Push:
        acct_id, acct = _account_id(s, p, body.account)
        return move_txn(s, st, account=acct, account_id=acct_id, ref=ref, host=body.host,
                        expected_generation=body.expected_generation)

    fast: Callable[[bool], Push | None] | None = None
    if net_store(st).mover is not None and _fast_account(p, body.account) is not None:
        def fast(wait: bool) -> Push | None:
            return fast_move(st, p, ref, body, wait=wait)

    change: Push = await _run(st, fn, fast)
    if change.before or change.after:
        await push(st, change)
    return Response(move_answer(change), media_type="application/json")


def fast_move(
    st: ControllerState, p: Principal, ref: str, body: w.AddressMove, *, wait: bool
) -> Push | None:
    """The move on the hot path (:class:`~.addr_move.FastMover`, SQLite), or None when
    the Session path must serve it (nothing changed then); ``wait=False``: raises
    :class:`~.addr_move.Busy` rather than wait for the store's write lock."""
    mover = net_store(st).mover
    acct = _fast_account(p, body.account)
    if mover is None or acct is None:
        return None
    return mover.move(st, account=acct[0], account_id=acct[1], ref=ref, host=body.host,
                      host_group=st.settings.network.host_group,
                      expected_generation=body.expected_generation, wait=wait)


def move_answer(change: Push) -> bytes:
    """The JSON answer of a move: the record as it is now."""
    # Serialized here, once: a returned model would be dumped, validated again and
    # encoded by FastAPI (the same JSON, several passes more on the path of every move).
    return record_out(change.record).model_dump_json().encode()


def move_txn(
    s: Session, st: ControllerState, *, account: str, account_id: int, ref: str, host: str,
    expected_generation: int | None,
) -> Push:
    """A move in the caller's Session transaction (every case, with the exact errors):
    Core statements only, the account's bound records counted per host once (the hosts
    after the move follow from the counts), the push bodies and endpoints made here."""
    rref = record_ref(ref)
    if isinstance(rref, int):
        _scoped_ref(s, account, rref, claim=False)
    if not s.execute(select(Host.id).where(Host.name == host)).first():
        raise NotFound(f"host {host!r} not found")
    per_host = addr_sync.bound_per_host(s, account)
    old, rec = records.move_from(s, account=account, record=rref, host=host,
                                 host_group=st.settings.network.host_group,
                                 expected_generation=expected_generation)
    s.execute(insert(_EVENTS).values(at=st.clock(), kind="address.moved",
                                     subject=rec.logical, account_id=account_id,
                                     data=event_data(rec)))
    before = set(per_host)
    after = set(per_host)
    if old.host is not None and per_host.get(old.host, 0) <= 1:
        after.discard(old.host)
    if rec.host is not None:
        after.add(rec.host)
    change = Push(rec, before, after, first=old.host)
    addr_sync.resolve_endpoints(s, st, change)
    return change


def _fast_account(p: Principal, given: str | None) -> tuple[str, int | None] | None:
    """The account of a move for the hot path: ``(name, id or None: look it up)``, or
    None when :func:`_account_id` would refuse (the Session path then says why)."""
    if p.admin:
        return (given, None) if given else None
    if p.account_id is None or p.account_name is None:
        return None
    if given is not None and given != p.account_name:
        return None
    return p.account_name, p.account_id


@router.get("/addresses", response_model=list[w.AddressRecord])
async def list_addresses(
    p: Auth, request: Request, account: AccountQ = None,
    network: Annotated[str | None, Query()] = None,
    state: Annotated[str | None, Query()] = None,
) -> list[w.AddressRecord]:
    def fn(s: Session) -> list[w.AddressRecord]:
        acct = _account(s, p, account)
        stmt = select(REC).where(REC.c.account == acct.name).order_by(REC.c.id)
        if network is not None:
            net = records.get_network(s, account=acct.name, name=network)
            stmt = stmt.where(REC.c.network_id == net.id)
        if state is not None:
            stmt = stmt.where(REC.c.state == State(state).value)
        return [record_out(records.record_view(r)) for r in s.execute(stmt)]

    out: list[w.AddressRecord] = await _run(state_of(request), fn)
    return out


@router.get("/addresses/{ref}", response_model=w.AddressRecord)
async def get_address(
    ref: str, p: Auth, request: Request, account: AccountQ = None
) -> w.AddressRecord:
    def fn(s: Session) -> w.AddressRecord:
        acct = _account(s, p, account)
        r = record_ref(ref)
        _scoped_load(s, acct, r, claim=False)
        return record_out(records.get_record(s, account=acct.name, record=r))

    out: w.AddressRecord = await _run(state_of(request), fn)
    return out


@router.get("/addresses/{ref}/history", response_model=list[w.AddressHistoryEntry])
async def address_history(
    ref: str, p: Auth, request: Request, account: AccountQ = None
) -> list[w.AddressHistoryEntry]:
    """Every transition, oldest first; outlives the record (released addresses too)."""
    def fn(s: Session) -> list[w.AddressHistoryEntry]:
        acct = _account(s, p, account)
        r = record_ref(ref)
        if isinstance(r, int):
            rows = records.history(s, account=acct.name, record_id=r)
        else:
            rows = records.history(s, account=acct.name, address=r)
        if not rows:
            raise NotFound(f"address {ref} of account {acct.name!r} has no history")
        return [w.AddressHistoryEntry.model_validate(
            {**dataclasses.asdict(h), "event": h.event.value,
             "from_state": h.from_state.value if h.from_state else None,
             "to_state": h.to_state.value}) for h in rows]

    out: list[w.AddressHistoryEntry] = await _run(state_of(request), fn)
    return out


@router.get("/records", response_model=list[w.RecordStatus])
async def list_records(
    p: Auth, request: Request, account: AccountQ = None,
    host: Annotated[str | None, Query()] = None,
) -> list[w.RecordStatus]:
    """Records with the generation each host applied; ``drift`` names lagging hosts."""
    def fn(s: Session) -> list[w.RecordStatus]:
        name = None if p.admin and account is None else _account(s, p, account).name
        return [
            w.RecordStatus(
                record=record_out(x.record), needed_by=list(x.needed_by),
                applied=[w.AppliedState(host=a.host, generation=a.generation, error=a.error,
                                        at=a.at) for a in x.applied],
                drift=list(x.drift),
            )
            for x in host_reports.list_records(s, account=name, host=host)
        ]

    out: list[w.RecordStatus] = await _run(state_of(request), fn)
    return out


# --- agents ---------------------------------------------------------------------------------


def _same_host(name: str, host: str) -> None:
    if name != host:
        raise Forbidden(f"this credential belongs to host {host!r}, not {name!r}")


@router.get("/hosts/{name}/records", response_model=w.HostRecords)
async def host_records(name: str, host: HostAuth, request: Request) -> w.HostRecords:
    """The full set of records this host must translate (its rebuild source)."""
    _same_host(name, host)
    out: w.HostRecords = await _run(state_of(request),
                                    lambda s: addr_sync.host_payload(s, name))
    return out


@router.post("/hosts/{name}/records/applied", status_code=204)
async def host_applied(
    name: str, body: w.HostReportIn, host: HostAuth, request: Request
) -> None:
    """What the host applied (or failed to), and optionally the instances it runs."""
    _same_host(name, host)

    def fn(s: Session) -> None:
        host_reports.report_applied(s, host=name, reports=[
            host_reports.AppliedReport(record_id=r.record_id, generation=r.generation,
                                       error=r.error) for r in body.reports
        ])
        if body.instances is not None:
            host_reports.report_instances(s, host=name, instances=body.instances)

    await _run(state_of(request), fn)

