"""Volumes: ``/v1/volumes`` (create, list, show, remove) and ``/v1/volumes/{name}/export``.

A volume is an account object that lives on one host. The controller reserves the name
in the store first (so two creates of one name cannot both reach a host), then asks the
host's ``volumes`` capability; if the host refuses, the reservation is dropped again.
An export designates exactly one peer host: the host's NBD endpoint (TLS with fleet
certificates, :mod:`edgevisor.pki`) lets only that host open the volume.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from edgevisor.control.auth import Principal, acting_account, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import (
    AlreadyExists,
    NotFound,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.sdk import volumes as wire
from edgevisor.store import repos
from edgevisor.store.models import Account, Host
from edgevisor.store.volume_models import VolumeRecord

__all__ = ["router"]

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
AccountQ = Annotated[str | None, Query(description="Account (admin token only).")]
_OP_TIMEOUT_S = 120.0


def _account(st: ControllerState, p: Principal, name: str | None) -> tuple[int, str]:
    a = acting_account(st, p, name)
    return a.id, a.name


def _out(v: VolumeRecord, account: str, live: dict[str, Any] | None = None) -> wire.VolumeInfo:
    return wire.VolumeInfo(
        name=v.name, account=account, host=v.host, size_bytes=v.size_bytes,
        block_size=v.block_size, exported_to=v.exported_to, created_at=v.created_at, live=live,
    )  # fmt: skip


def _get(st: ControllerState, account_id: int, name: str) -> VolumeRecord:
    with st.store.session() as s:
        v = s.scalars(
            select(VolumeRecord).where(
                VolumeRecord.account_id == account_id, VolumeRecord.name == name
            )
        ).first()
        if v is None:
            raise NotFound(f"volume {name!r} not found")
        s.expunge(v)
        return v


def _place(st: ControllerState, wanted: str | None) -> str:
    with st.store.session() as s:
        hosts = {h.name: h for h in repos.list_hosts(s)}
        if wanted is not None:
            h = hosts.get(wanted)
            if h is None:
                raise NotFound(f"host {wanted!r} not found")
            if h.state != "up":
                raise PeerUnavailable(f"host {wanted!r} is down")
            return wanted
        up: list[Host] = [h for h in hosts.values() if h.state == "up"]
        if not up:
            raise UnavailableError("no host is up to place the volume on")
        # most free disk first; the name breaks ties so placement is deterministic
        return sorted(up, key=lambda h: (-h.disk_mb, h.name))[0].name


def _reserve(
    st: ControllerState, acct_id: int, name: str, host: str, size: int, bs: int, now: float
) -> VolumeRecord:
    with st.store.session() as s:
        exists = s.scalars(
            select(VolumeRecord.id).where(
                VolumeRecord.account_id == acct_id, VolumeRecord.name == name
            )
        ).first()
        if exists is not None:
            raise AlreadyExists(f"volume {name!r} already exists")
        rec = VolumeRecord(
            account_id=acct_id, name=name, host=host, size_bytes=size, block_size=bs,
            created_at=now,
        )  # fmt: skip
        s.add(rec)
    return rec


@router.post("/volumes", response_model=wire.VolumeInfo, status_code=201)
async def create_volume(
    body: wire.VolumeCreate, request: Request, p: Auth, account: AccountQ = None
) -> wire.VolumeInfo:
    st = state_of(request)
    acct_id, acct_name = _account(st, p, account)
    try:
        size = wire.parse_size(body.size)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if size <= 0 or size % 512:
        raise RequestError(f"volume size must be a positive multiple of 512 bytes: {size}")
    block_size = body.block_size or st.settings.storage.default_block_size_bytes
    if block_size < 4096 or block_size > 1 << 22 or block_size & (block_size - 1):
        raise RequestError(f"block size must be a power of two in [4K, 4M]: {block_size}")
    host = _place(st, body.host)
    now = st.clock()
    try:
        rec = _reserve(st, acct_id, body.name, host, size, block_size, now)
    except IntegrityError:  # a concurrent create of the same name won
        raise AlreadyExists(f"volume {body.name!r} already exists") from None
    payload = {"account": acct_name, "name": body.name, "size_bytes": size,
               "block_size": block_size}  # fmt: skip
    try:
        live = await st.links.call(host, "volumes.create", payload, timeout_s=_OP_TIMEOUT_S)
    except BaseException:
        with st.store.session() as s:
            row = s.get(VolumeRecord, rec.id)
            if row is not None:
                s.delete(row)
        raise
    st.publish("volume.created", subject=body.name, account_id=acct_id,
               data={"host": host, "size_bytes": size})  # fmt: skip
    return _out(rec, acct_name, live)


@router.get("/volumes", response_model=list[wire.VolumeInfo])
def list_volumes(request: Request, p: Auth, account: AccountQ = None) -> list[wire.VolumeInfo]:
    st = state_of(request)
    with st.store.session() as s:
        q = select(VolumeRecord, Account.name).join(Account, Account.id == VolumeRecord.account_id)
        if account is not None:
            q = q.where(Account.id == p.scope(repos.get_account(s, account)).id)
        elif not p.admin:
            q = q.where(VolumeRecord.account_id == p.account_id)
        rows = s.execute(q.order_by(Account.name, VolumeRecord.name)).all()
        return [_out(v, a) for v, a in rows]


@router.get("/volumes/{name}", response_model=wire.VolumeInfo)
async def get_volume(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.VolumeInfo:
    """The stored record, plus what the host reports when it answers."""
    st = state_of(request)
    acct_id, acct_name = _account(st, p, account)
    v = _get(st, acct_id, name)
    live: dict[str, Any] | None
    try:
        live = await st.links.call(
            v.host, "volumes.info", {"account": acct_name, "name": name}, timeout_s=10
        )
    except (PeerUnavailable, NotFound):
        live = None
    return _out(v, acct_name, live)


@router.delete("/volumes/{name}", status_code=204)
async def remove_volume(name: str, request: Request, p: Auth, account: AccountQ = None) -> Response:
    st = state_of(request)
    acct_id, acct_name = _account(st, p, account)
    v = _get(st, acct_id, name)
    with st.store.session() as s:
        host_known = s.scalars(select(Host.id).where(Host.name == v.host)).first() is not None
    if host_known:  # a host removed from the fleet took its volumes with it
        await st.links.call(
            v.host, "volumes.remove", {"account": acct_name, "name": name, "missing_ok": True},
            timeout_s=_OP_TIMEOUT_S,
        )  # fmt: skip
    with st.store.session() as s:
        row = s.get(VolumeRecord, v.id)
        if row is not None:
            s.delete(row)
    st.publish("volume.removed", subject=name, account_id=acct_id, data={"host": v.host})
    return Response(status_code=204)


@router.post("/volumes/{name}/export", response_model=wire.VolumeExport)
async def export_volume(
    name: str,
    body: wire.VolumeExportRequest,
    request: Request,
    p: Auth,
    account: AccountQ = None,
) -> wire.VolumeExport:
    st = state_of(request)
    acct_id, acct_name = _account(st, p, account)
    v = _get(st, acct_id, name)
    with st.store.session() as s:
        repos.get_host(s, body.to)  # NotFound for an unknown peer
    if body.to == v.host:
        raise RequestError(f"volume {name!r} already lives on {body.to!r}")
    ep: dict[str, Any] = await st.links.call(
        v.host, "volumes.export", {"account": acct_name, "name": name, "peer": body.to},
        timeout_s=30,
    )  # fmt: skip
    with st.store.session() as s:
        row = s.get(VolumeRecord, v.id)
        if row is not None:
            row.exported_to = body.to
    st.publish("volume.exported", subject=name, account_id=acct_id,
               data={"host": v.host, "peer": body.to})  # fmt: skip
    return wire.VolumeExport(
        name=name, host=str(ep["host"]), address=str(ep["address"]), port=int(ep["port"]),
        export=str(ep["export"]), peer=body.to,
        uri=f"nbds://{_uri_host(str(ep['address']))}:{ep['port']}/{ep['export']}",
    )  # fmt: skip


@router.delete("/volumes/{name}/export", status_code=204)
async def unexport_volume(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> Response:
    st = state_of(request)
    acct_id, acct_name = _account(st, p, account)
    v = _get(st, acct_id, name)
    await st.links.call(v.host, "volumes.unexport", {"account": acct_name, "name": name})
    with st.store.session() as s:
        row = s.get(VolumeRecord, v.id)
        if row is not None:
            row.exported_to = None
    return Response(status_code=204)


def _uri_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
