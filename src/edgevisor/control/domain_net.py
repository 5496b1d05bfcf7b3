"""Domains and their logical addresses: the address-record side of domains and migration.

A domain created with a network gets a logical address of its account: a fresh one
(any free, or the one asked for) that is allocated and bound at once, or a preserved one
that is claimed. The record is bound to the domain's *instance* (:func:`instance_name`,
unique across accounts as the records require) on the domain's host; the host's agent
puts the address on the domain's network namespace and reports the instance while the
domain exists there (so leak collection leaves the record alone).

Each change here is one network-store transaction (an error leaves nothing changed: a
bad network, an address outside it or taken, another account's address are refused
before anything is written), followed by the push to the hosts that need the record
(:mod:`edgevisor.control.addr_sync`, the same path as ``/v1/addresses``): a move pushes
the host giving the record up first (fencing, break-before-make).

The migration runner's ``MoveRecord`` calls :func:`move_record`, which is idempotent: a
record already on the wanted host is left as it is (a retried or undone move).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from edgevisor.control.addr_sync import (
    Push,
    ensure_default_pool,
    net_store,
    push_change,
    record_ref,
    stage_change,
)
from edgevisor.control.state import ControllerState
from edgevisor.errors import Forbidden, RequestError
from edgevisor.network import records
from edgevisor.network.lifecycle import State
from edgevisor.network.pools import REC
from edgevisor.network.records import AddressRecord
from edgevisor.store import repos

__all__ = [
    "AddressRequest",
    "instance_name",
    "let_go",
    "move_record",
    "reserve",
    "undo_reserve",
]


@dataclass(frozen=True)
class AddressRequest:
    """What a create asked for: ``network`` (any free address, or ``address`` in it), or
    ``claim`` (a preserved address of the account: its logical address or record id)."""

    network: str | None = None
    address: str | None = None
    claim: str | None = None

    def __post_init__(self) -> None:
        if self.address is not None and self.claim is not None:
            raise RequestError("give either an address to allocate or one to claim, not both")
        if self.address is not None and self.network is None:
            raise RequestError("an address needs its network (--network)")

    @property
    def wanted(self) -> bool:
        return self.network is not None or self.claim is not None


def instance_name(account: str, name: str) -> str:
    """The instance a domain's record is bound to (unique across accounts)."""
    return f"domain:{account}.{name}"


def _account_id(s: Session, account: str) -> int | None:
    from edgevisor.store.models import Account

    return s.execute(select(Account.id).where(Account.name == account)).scalar()


async def _change(
    st: ControllerState,
    account: str,
    op: Callable[[Session], AddressRecord | None],
    kind: str,
    *,
    first: Callable[[Session], str | None] | None = None,
) -> AddressRecord | None:
    """Run ``op`` in one transaction (with its event), then push the change to the hosts.
    ``op`` returning None means nothing changed (nothing is pushed)."""

    def work() -> Push | None:
        with net_store(st).session() as s:
            return stage_change(s, st, account=account, account_id=_account_id(s, account),
                                kind=kind, op=op, first=first(s) if first else None)

    change = await run_in_threadpool(work)
    if change is None:
        return None
    await push_change(st, change)
    return change.record


async def reserve(
    st: ControllerState, account: str, req: AddressRequest, *, host: str, instance: str
) -> AddressRecord:
    """Allocate and bind (or claim) the domain's address on ``host``: one transaction;
    any refusal (unknown network, address outside it or taken, not preserved, another
    account's) leaves nothing changed."""
    group = st.settings.network.host_group

    def op(s: Session) -> AddressRecord:
        repos.get_host(s, host)
        if req.claim is not None:
            ref = record_ref(req.claim)
            if isinstance(ref, int):
                owner = s.execute(select(REC.c.account).where(REC.c.id == ref)).scalar()
                if owner is not None and owner != account:
                    raise Forbidden(f"record {ref} belongs to another account; it cannot be "
                                    f"claimed by account {account!r}")  # fmt: skip
            rec = records.get_record(s, account=account, record=ref)
            if req.network is not None:
                net = records.get_network(s, account=account, name=req.network)
                if net.id != rec.network_id:
                    raise RequestError(f"address {rec.logical} is not in network "
                                       f"{req.network!r}")  # fmt: skip
            _check_v4(rec.logical)
            ensure_default_pool(s, st, rec.logical)
            return records.claim(s, account=account, record=rec.id, instance=instance,
                                 host=host, host_group=group)  # fmt: skip
        assert req.network is not None
        net = records.get_network(s, account=account, name=req.network)
        if net.family != 4:
            raise RequestError(f"network {req.network!r} is IPv{net.family}; domains take "
                               "IPv4 logical addresses")  # fmt: skip
        rec = records.allocate(s, account=account, network=req.network, address=req.address)
        ensure_default_pool(s, st, rec.logical)
        return records.bind(s, account=account, record=rec.id, instance=instance, host=host,
                            host_group=group)  # fmt: skip

    kind = "address.claimed" if req.claim is not None else "address.bound"
    rec = await _change(st, account, op, kind)
    assert rec is not None
    return rec


def _check_v4(logical: str) -> None:
    if ipaddress.ip_address(logical).version != 4:
        raise RequestError(f"address {logical} is IPv6; domains take IPv4 logical addresses")


async def undo_reserve(st: ControllerState, account: str, record_id: int, *, claimed: bool) -> None:
    """Give back what :func:`reserve` took after a create failed: a claimed address is
    preserved again; a fresh one is released at once (no hold-down: nobody used it)."""
    if claimed:
        await let_go(st, account, record_id, release=False)
        return

    def op(s: Session) -> AddressRecord | None:
        rec = _current(s, record_id)
        if rec is None or rec.state is State.HELD:
            return None
        return records.release(s, account=account, record=record_id, hold_down_s=0.0)

    await _change(st, account, op, "address.released", first=_host_of(record_id))


async def let_go(st: ControllerState, account: str, record_id: int, *, release: bool) -> None:
    """The domain is removed: preserve its address for the account (or release it).

    Idempotent: a record already preserved (or gone) is left alone; releasing a
    preserved one releases it.
    """
    ipam = st.settings.network.ipam()

    def op(s: Session) -> AddressRecord | None:
        rec = _current(s, record_id)
        if rec is None or rec.state is State.HELD:
            return None
        if release:
            return records.release(s, account=account, record=record_id, settings=ipam)
        if rec.state is not State.BOUND:
            return None
        return records.preserve(s, account=account, record=record_id)

    kind = "address.released" if release else "address.preserved"
    await _change(st, account, op, kind, first=_host_of(record_id))


async def move_record(
    st: ControllerState, account: str, record_id: int, host: str
) -> AddressRecord | None:
    """The migration's switch: the record moves to ``host`` with a new physical address
    (fencing: the old host is pushed first). Already there: nothing changes."""
    group = st.settings.network.host_group

    def op(s: Session) -> AddressRecord | None:
        rec = _current(s, record_id)
        if rec is not None and rec.state is State.BOUND and rec.host == host:
            return None  # a retry, or an undo of a move that never happened
        repos.get_host(s, host)
        return records.move(s, account=account, record=record_id, host=host,
                            host_group=group)  # fmt: skip

    return await _change(st, account, op, "address.moved", first=_host_of(record_id))


def _current(s: Session, record_id: int) -> AddressRecord | None:
    row = s.execute(select(REC).where(REC.c.id == record_id)).one_or_none()
    return records.record_view(row) if row is not None else None


def _host_of(record_id: int) -> Callable[[Session], str | None]:
    def get(s: Session) -> str | None:
        rec = _current(s, record_id)
        return rec.host if rec is not None else None

    return get


def record_info(st: ControllerState, record_id: int) -> dict[str, Any] | None:
    """The record as a plain dict (for ``domain show``), or None when it is gone."""
    with net_store(st).session() as s:
        rec = _current(s, record_id)
    if rec is None:
        return None
    return {"id": rec.id, "logical": rec.logical, "state": rec.state.value, "host": rec.host,
            "physical": rec.physical, "generation": rec.generation}  # fmt: skip
