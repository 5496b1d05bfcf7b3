"""Domains: ``/v1/domains`` (create, list, show, start, stop, remove).

A domain runs on one host; the controller keeps where (host, volume, role) and the last
phase and restart count its host reported (refreshed on every call and by
:func:`run_domain_status`, which publishes ``domain.phase`` events on changes). Create
claims the name in the store first (the unique constraint settles races), then asks the
host; if the host refuses, the claim is dropped, so a refused create leaves nothing behind.
``show`` asks the host for the live state and records it; when the host is unreachable it
answers from the store.

Logical addresses (:mod:`.domain_net`): with a network (or a preserved address to
claim), create reserves the address record bound to the domain's instance on its host
*before* anything else is written (a bad network, an address outside it or taken, another
account's network or address: refused with nothing changed), then passes the address to
the host, which puts it on the domain's network namespace. A failed create gives it back.
``rm`` preserves the address for the account by default (``release=true`` releases it):
an address is what peers know a service by, so removing the domain must not lose it by
accident; a preserved one can be claimed by the next domain or released later, a released
one cannot be got back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from edgevisor.control import domain_net
from edgevisor.control.addr_sync import net_store
from edgevisor.control.auth import Principal, acting_account, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import (
    AlreadyExists,
    EdgevisorError,
    NotFound,
    PayloadTooLarge,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.network import records
from edgevisor.network.records import AddressRecord
from edgevisor.sdk import domains as wire
from edgevisor.sdk.volumes import parse_size
from edgevisor.store import repos
from edgevisor.store.domain_models import Domain
from edgevisor.store.models import Account
from edgevisor.store.task_models import Bundle

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
AccountQ = Annotated[str | None, Query(description="Account (admin token only).")]
CREATE_TIMEOUT_S = 300.0  # mkfs of a large volume through FUSE


def _app_bytes(st: ControllerState, app_b64: str | None) -> bytes | None:
    if not app_b64:
        return None
    try:
        app = base64.b64decode(app_b64, validate=True)
    except ValueError as exc:
        raise RequestError(f"app_b64 is not base64: {exc}") from exc
    limit = st.settings.domains.app_max_bytes
    if len(app) > limit:
        raise PayloadTooLarge(f"the app is {len(app)} bytes; the limit is {limit}")
    return app


def _pick_host(st: ControllerState, wanted: str | None) -> str:
    with st.store.session() as s:
        hosts = {h.name: h.state for h in repos.list_hosts(s)}
        load: dict[str, int] = {}
        for d in s.scalars(select(Domain)):
            load[d.host] = load.get(d.host, 0) + 1
    if wanted is not None:
        if wanted not in hosts:
            raise NotFound(f"host {wanted!r} not found")
        if hosts[wanted] != "up":
            raise PeerUnavailable(f"host {wanted!r} is down")
        return wanted
    up = sorted((load.get(h, 0), h) for h, state in hosts.items() if state == "up")
    if not up:
        raise UnavailableError("no host is up to run the domain")
    return up[0][1]


def _out(d: Domain, account: str, live: dict[str, Any] | None = None) -> wire.DomainInfo:
    return wire.DomainInfo(
        name=d.name, account=account, host=d.host, command=list(d.command), volume=d.volume,
        volume_size_bytes=d.volume_size_bytes, restart=d.restart, memory_mb=d.memory_mb,
        cpu=d.cpu, role=d.role, phase=d.phase, desired=d.desired,
        restart_count=d.restart_count, address=d.address, network=d.network,
        address_record_id=d.address_record_id, created_at=d.created_at,
        updated_at=d.updated_at, app_digest=d.app_digest, live=live,
    )  # fmt: skip


def _record(st: ControllerState, domain_id: int, info: dict[str, Any]) -> Domain:
    """Store what the host reported; returns the updated row."""
    with st.store.session() as s:
        d = s.get(Domain, domain_id)
        if d is None:
            raise NotFound("domain not found")
        d.phase = str(info.get("phase", d.phase))[:16]
        d.desired = str(info.get("desired", d.desired))[:16]
        d.restart_count = int(info.get("restarts", d.restart_count))
        if d.address_record_id is None:  # a logical address is the controller's to set
            d.address = info.get("address") or d.address
        d.memory_mb = int(info.get("memory_mb", d.memory_mb))
        d.cpu = float(info.get("cpu", d.cpu))
        d.updated_at = st.clock()
        s.flush()
        s.expunge(d)
        return d


def _domain(st: ControllerState, acct: Account, name: str) -> Domain:
    with st.store.session() as s:
        d = s.scalar(select(Domain).where(Domain.account_id == acct.id, Domain.name == name))
        if d is None:
            raise NotFound(f"domain {name!r} not found in account {acct.name!r}")
        s.expunge(d)
        return d


@router.post("/domains", response_model=wire.DomainInfo, status_code=201)
async def create_domain(
    body: wire.DomainCreate, request: Request, p: Auth, account: AccountQ = None
) -> wire.DomainInfo:
    """Create a domain with a new volume and start it on a host."""
    st = state_of(request)
    acct = acting_account(st, p, account)
    try:
        size = parse_size(body.volume_size)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    if size < 16 << 20:
        raise RequestError(f"volume size {size} is too small: a domain needs at least 16M")
    app = _app_bytes(st, body.app_b64)
    req = domain_net.AddressRequest(network=body.network, address=body.address,
                                    claim=body.claim)  # fmt: skip
    host = _pick_host(st, body.host)
    volume = f"domain-{body.name}"
    digest = hashlib.sha256(app).hexdigest() if app is not None else None
    with st.store.session() as s:
        if s.scalar(select(Domain).where(Domain.account_id == acct.id, Domain.name == body.name)):
            raise AlreadyExists(f"domain {body.name!r} already exists in account {acct.name!r}")
    rec = None
    if req.wanted:  # the first write: a refusal here leaves nothing changed
        rec = await domain_net.reserve(
            st, acct.name, req, host=host, instance=domain_net.instance_name(acct.name, body.name)
        )
    try:
        network = None
        if rec is not None:  # (before the store session: on SQLite both take write locks)
            network = body.network or await run_in_threadpool(
                _network_name, st, acct, rec.network_id
            )
        domain_id = _insert(st, acct, body, host, volume, size, app, digest, rec, network)
    except BaseException:
        if rec is not None:
            await domain_net.undo_reserve(st, acct.name, rec.id, claimed=req.claim is not None)
        raise
    payload = {
        "account": acct.name, "name": body.name, "command": list(body.command),
        "volume": volume, "volume_size_bytes": size, "restart": body.restart,
        "memory_mb": body.memory_mb, "cpu": body.cpu, "env": dict(body.env),
        "app_b64": body.app_b64, "address": rec.logical if rec is not None else None,
        "instance": rec.instance if rec is not None else None,
    }  # fmt: skip
    try:
        info = await st.links.call(host, "domains.create", payload, timeout_s=CREATE_TIMEOUT_S)
    except BaseException as exc:
        if not isinstance(exc, AlreadyExists):  # never remove a domain that was there
            with contextlib.suppress(EdgevisorError):
                await st.links.call(
                    host, "domains.remove", {"account": acct.name, "name": body.name}
                )
        with st.store.session() as s:
            gone = s.get(Domain, domain_id)
            if gone is not None:
                s.delete(gone)
        if rec is not None:
            with contextlib.suppress(EdgevisorError):
                await domain_net.undo_reserve(
                    st, acct.name, rec.id, claimed=req.claim is not None
                )
        if isinstance(exc, EdgevisorError):
            exc.message = f"creating domain on host {host!r} failed: {exc.message}"
            exc.args = (exc.message,)
        raise
    d = _record(st, domain_id, info)
    st.publish(
        "domain.created", subject=body.name, account_id=acct.id,
        data={"host": host, "phase": d.phase, "address": d.address},
    )  # fmt: skip
    return _out(d, acct.name, info)


def _insert(
    st: ControllerState, acct: Account, body: wire.DomainCreate, host: str, volume: str,
    size: int, app: bytes | None, digest: str | None, rec: AddressRecord | None,
    network: str | None,
) -> int:
    """Claim the domain's name in the store (the unique constraint settles races)."""
    now = st.clock()
    with st.store.session() as s:
        if digest is not None and s.get(Bundle, digest) is None:
            s.add(Bundle(digest=digest, size_bytes=len(app or b""), data=app, created_at=now))
        if s.scalar(select(Domain).where(Domain.account_id == acct.id, Domain.name == body.name)):
            raise AlreadyExists(f"domain {body.name!r} already exists in account {acct.name!r}")
        row = Domain(
            account_id=acct.id, name=body.name, host=host, command=list(body.command),
            volume=volume, volume_size_bytes=size, restart=body.restart,
            memory_mb=body.memory_mb or 0, cpu=body.cpu if body.cpu is not None else -1.0,
            role="primary", phase="creating", desired="running", restart_count=0,
            env=dict(body.env), app_digest=digest, created_at=now, updated_at=now,
            address=rec.logical if rec is not None else None,
            network=network, address_record_id=rec.id if rec is not None else None,
        )  # fmt: skip
        s.add(row)
        try:
            s.flush()
        except IntegrityError as exc:
            raise AlreadyExists(f"domain {body.name!r} already exists") from exc
        return row.id


def _network_name(st: ControllerState, acct: Account, network_id: int) -> str | None:
    with net_store(st).session() as s:
        for n in records.list_networks(s, account=acct.name):
            if n.id == network_id:
                return n.name
    return None


@router.get("/domains", response_model=list[wire.DomainInfo])
def list_domains(request: Request, p: Auth) -> list[wire.DomainInfo]:
    st = state_of(request)
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        q = select(Domain).order_by(Domain.name)
        if not p.admin:
            q = q.where(Domain.account_id == p.account_id)
        return [_out(d, names[d.account_id]) for d in s.scalars(q)]


@router.get("/domains/{name}", response_model=wire.DomainInfo)
async def get_domain(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.DomainInfo:
    """One domain, with the live state its host reports (stored state if unreachable)."""
    st = state_of(request)
    acct = acting_account(st, p, account)
    d = _domain(st, acct, name)
    try:
        live = await st.links.call(d.host, "domains.info", {"account": acct.name, "name": name})
    except UnavailableError:
        return _out(d, acct.name)
    return _out(_record(st, d.id, live), acct.name, live)


async def _act(request: Request, p: Principal, name: str, account: str | None, op: str) -> Any:
    st = state_of(request)
    acct = acting_account(st, p, account)
    d = _domain(st, acct, name)
    info = await st.links.call(
        d.host, f"domains.{op}", {"account": acct.name, "name": name}, timeout_s=120
    )
    row = _record(st, d.id, info)
    st.publish(f"domain.{op}", subject=name, account_id=acct.id, data={"phase": row.phase})
    return _out(row, acct.name, info)


@router.post("/domains/{name}/start", response_model=wire.DomainInfo)
async def start_domain(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.DomainInfo:
    result: wire.DomainInfo = await _act(request, p, name, account, "start")
    return result


@router.post("/domains/{name}/stop", response_model=wire.DomainInfo)
async def stop_domain(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.DomainInfo:
    result: wire.DomainInfo = await _act(request, p, name, account, "stop")
    return result


@router.delete("/domains/{name}", status_code=204)
async def remove_domain(
    name: str, request: Request, p: Auth, account: AccountQ = None,
    release: Annotated[
        bool, Query(description="Release the logical address (default: preserve it).")
    ] = False,
) -> None:
    """Stop the domain and delete it and its volume (refused while its host is down).

    Its logical address is preserved for the account unless ``release``.
    """
    st = state_of(request)
    acct = acting_account(st, p, account)
    d = _domain(st, acct, name)
    with contextlib.suppress(NotFound):  # already gone there
        await st.links.call(
            d.host, "domains.remove", {"account": acct.name, "name": name}, timeout_s=120
        )
    if d.address_record_id is not None:
        await domain_net.let_go(st, acct.name, d.address_record_id, release=release)
    with st.store.session() as s:
        row = s.get(Domain, d.id)
        if row is not None:
            s.delete(row)
    st.publish("domain.removed", subject=name, account_id=acct.id,
               data={"address": d.address, "released": release} if d.network else None)


# -- status refresh ---------------------------------------------------------------------------


def status_changes(
    stored: Iterable[tuple[int, str, str, int]],
    reported: dict[tuple[str, str], dict[str, Any]],
) -> list[tuple[int, str, str, int]]:
    """Rows ``(id, "account.name", phase, restarts)`` whose host reports something else.

    A domain being created (phase ``creating``) is the create call's to record; a domain
    the host does not report is left alone (its host may have just restarted).
    """
    out = []
    for row_id, qualified, phase, restarts in stored:
        if phase == "creating":
            continue
        account, _, name = qualified.partition(".")
        info = reported.get((account, name))
        if info is None:
            continue
        new_phase, new_restarts = str(info.get("phase", phase)), int(info.get("restarts", 0))
        if (new_phase, new_restarts) != (phase, restarts):
            out.append((row_id, qualified, new_phase, new_restarts))
    return out


async def refresh_domains(st: ControllerState) -> int:
    """Ask every up host with domains for their state; store and publish the changes."""
    with st.store.session() as s:
        up = {h.name for h in repos.list_hosts(s) if h.state == "up"}
        names = {a.id: a.name for a in repos.list_accounts(s)}
        rows: dict[str, list[tuple[int, str, str, int, int]]] = {}
        for d in s.scalars(select(Domain)):
            if d.host in up:
                rows.setdefault(d.host, []).append(
                    (d.id, f"{names[d.account_id]}.{d.name}", d.phase, d.restart_count,
                     d.account_id)
                )  # fmt: skip
    changed = 0
    for host, host_rows in rows.items():
        try:
            listed = await st.links.call(host, "domains.list", {}, timeout_s=30)
        except (UnavailableError, NotFound):  # down, or an agent without domains
            continue
        reported = {(str(i["account"]), str(i["name"])): i for i in listed}
        account_of = {r[0]: r[4] for r in host_rows}
        for row_id, qualified, phase, restarts in status_changes(
            [r[:4] for r in host_rows], reported
        ):
            with st.store.session() as s:
                row = s.get(Domain, row_id)
                if row is None or row.phase == "creating":
                    continue
                row.phase, row.restart_count, row.updated_at = phase[:16], restarts, st.clock()
            st.publish(
                "domain.phase", subject=qualified.partition(".")[2],
                account_id=account_of[row_id], data={"phase": phase, "restarts": restarts},
            )  # fmt: skip
            changed += 1
    return changed


async def run_domain_status(st: ControllerState) -> None:
    """Background loop: keep the stored phase and restart count of domains current."""
    interval = st.settings.controller.reconcile_interval_s
    while True:
        try:
            await refresh_domains(st)
        except Exception:  # the loop must outlive a transient store or host error
            log.exception("domain status refresh failed; retrying")
        await asyncio.sleep(interval)
