"""Coordinated devices on the controller: ``/v1/devices``, ``/v1/routes``, ``/v1/timers``,
``/v1/shadows/{device}``, ``/v1/device-messages``, and the agents' intake endpoints.

Every object belongs to an account and lives on one host; the agent of that host is the
authority (it keeps working offline), the rows here record what the account asked for.
Devices, routes and timers are created on the agent first (it refuses a route to a task it
does not run), then recorded. A device's password is returned once and never stored here.

Shadows. The controller keeps a copy of each shadow. Agents sync theirs through the spool
(``kind = "shadow"`` items); an update through the API goes to the agent (optimistic
version, 409 with the current version when stale). If the agent is unreachable, the update
is applied to the controller's copy (same version check) and marked ``pending``; the agent
pulls pending copies when it reconnects and merges them by the rule documented in
:func:`edgevisor.devices.shadows.reconcile`: ``reported`` is the agent's, ``desired`` comes
from the copy with the higher version (newest desired wins), ties go to the later
``desired_updated_at``, then to the agent. When an agent's sync arrives for a pending copy,
the controller applies the same rule (its copy as the remote side) and keeps it pending.

Messages routed to the controller arrive as ``kind = "message"`` spool items; each is stored
once (``(host, seq, spooled_at)``), published on the event stream as ``device.message`` and
listed by ``GET /v1/device-messages``.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgevisor.agent.tasks import qualified, split
from edgevisor.control.auth import Principal, require_host, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.devices.registry import valid_device_name
from edgevisor.devices.shadows import Shadow, apply_update, reconcile
from edgevisor.errors import (
    Conflict,
    Forbidden,
    NotFound,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.pki import load_csr
from edgevisor.sdk import devices as wire
from edgevisor.store import repos
from edgevisor.store.device_models import DeviceMessage, DeviceRow, RouteRow, ShadowRow, TimerRow
from edgevisor.store.models import Account

router = APIRouter(prefix="/v1")
_MAX_CSR = 16 << 10  # a CSR with an RSA-4096 key is under 2 KiB
Auth = Annotated[Principal, Depends(require_principal)]
HostAuth = Annotated[str, Depends(require_host)]
AccountQ = Annotated[str | None, Query(description="The account (admin only).")]


def account_of(st: ControllerState, p: Principal, name: str | None) -> tuple[int, str]:
    """(account id, name) the request acts for; an account token acts for itself."""
    with st.store.session() as s:
        if name is None:
            if p.admin:
                raise RequestError("the admin must name the account (?account=NAME)")
            acct = s.get(Account, p.account_id)
            if acct is None:
                raise NotFound("account not found")
        else:
            acct = p.scope(repos.get_account(s, name))
        return acct.id, acct.name


def pick_host(st: ControllerState, wanted: str | None) -> str:
    """The named host, or the first host that is up."""
    with st.store.session() as s:
        hosts = {h.name: h.state for h in repos.list_hosts(s)}
    if wanted is not None:
        if wanted not in hosts:
            raise NotFound(f"host {wanted!r} not found")
        return wanted
    up = sorted(h for h, state in hosts.items() if state == "up")
    if not up:
        raise UnavailableError("no host is up")
    return up[0]


def _device_row(s: Session, account_id: int, name: str) -> DeviceRow:
    row = s.scalar(
        select(DeviceRow).where(DeviceRow.account_id == account_id, DeviceRow.name == name)
    )
    if row is None:
        raise NotFound(f"device {name!r} not found")
    return row


# --- devices -------------------------------------------------------------------------------


@router.post("/devices", response_model=wire.DeviceCreated, status_code=201)
async def add_device(
    request: Request,
    p: Auth,
    account: AccountQ = None,
    body: Annotated[dict[str, Any], Body()] = ...,  # type: ignore[assignment]
) -> wire.DeviceCreated:
    """Register a device on a host; the answer holds its password (and, with TLS on, its
    client certificate and key), shown only this once."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("device name must be a non-empty string")
    valid_device_name(qualified(acct, name))  # checked before anything is created
    with st.store.session() as s:
        if s.scalar(
            select(DeviceRow).where(DeviceRow.account_id == acct_id, DeviceRow.name == name)
        ):
            raise Conflict(f"device {name!r} already exists")
    host = pick_host(st, body.get("host"))
    cert = body.get("cert")
    if cert is not None and not isinstance(cert, bool):
        raise RequestError("'cert' must be true or false")
    out = await st.links.call(
        host,
        "devices.add",
        {"account": acct, "name": name, "password": body.get("password"), "cert": cert},
    )
    now = st.clock()
    with st.store.session() as s:
        s.add(DeviceRow(account_id=acct_id, name=name, host=host, created_at=now))
        repos.add_event(s, "device.added", now, subject=name, account_id=acct_id,
                        data={"host": host})  # fmt: skip
    return wire.DeviceCreated(
        name=name, account=acct, host=host, username=out["username"], created_at=now,
        password=out["password"], broker_url=out["broker_url"], topic_root=out["topic_root"],
        tls=wire.DeviceTLS.model_validate(out["tls"]) if out.get("tls") else None,
    )  # fmt: skip


@router.get("/devices", response_model=list[wire.DeviceInfo])
def list_devices(request: Request, p: Auth, account: AccountQ = None) -> list[wire.DeviceInfo]:
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        rows = s.scalars(
            select(DeviceRow).where(DeviceRow.account_id == acct_id).order_by(DeviceRow.name)
        )
        return [
            wire.DeviceInfo(name=r.name, account=acct, host=r.host,
                            username=qualified(acct, r.name), created_at=r.created_at)
            for r in rows
        ]  # fmt: skip


@router.delete("/devices/{name}", status_code=204)
async def remove_device(name: str, request: Request, p: Auth, account: AccountQ = None) -> None:
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        host = _device_row(s, acct_id, name).host
    with contextlib.suppress(NotFound):  # already gone on the host
        await st.links.call(host, "devices.remove", {"account": acct, "name": name})
    with st.store.session() as s:
        s.delete(_device_row(s, acct_id, name))
        shadow = s.scalar(
            select(ShadowRow).where(ShadowRow.account_id == acct_id, ShadowRow.device == name)
        )
        if shadow is not None:
            s.delete(shadow)
        repos.add_event(s, "device.removed", st.clock(), subject=name, account_id=acct_id)


@router.post("/devices/{name}/certificate", response_model=wire.DeviceTLS)
async def device_certificate(
    name: str,
    request: Request,
    p: Auth,
    account: AccountQ = None,
    body: Annotated[dict[str, Any] | None, Body()] = None,
) -> wire.DeviceTLS:
    """A new TLS client certificate for a device; the old one is revoked and the device's
    open connections are closed. Body ``{"csr_pem": ...}``: over the key of the device's own
    CSR (the key never leaves the device; the CN is still the device's username);
    without it over a new key, shown once."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    csr = (body or {}).get("csr_pem")
    if csr is not None:
        if not isinstance(csr, str):
            raise RequestError("'csr_pem' must be a PEM string")
        if len(csr) > _MAX_CSR:
            raise RequestError(f"'csr_pem' is {len(csr)} characters; at most {_MAX_CSR}")
        load_csr(csr)  # refused here, before the host revokes anything
    with st.store.session() as s:
        host = _device_row(s, acct_id, name).host
    call: dict[str, Any] = {"account": acct, "name": name}
    if csr is not None:
        call["csr_pem"] = csr
    out = await st.links.call(host, "devices.certificate", call)
    with st.store.session() as s:
        repos.add_event(s, "device.certificate", st.clock(), subject=name, account_id=acct_id,
                        data={"host": host, "serial": out["serial"]})  # fmt: skip
    return wire.DeviceTLS.model_validate(out)


# --- routes and timers ---------------------------------------------------------------------


def _route_out(spec: dict[str, Any], host: str) -> wire.RouteInfo:
    return wire.RouteInfo.model_validate({**spec, "host": host})


@router.post("/routes", response_model=wire.RouteInfo, status_code=201)
async def add_route(
    request: Request,
    p: Auth,
    account: AccountQ = None,
    body: Annotated[dict[str, Any], Body()] = ...,  # type: ignore[assignment]
) -> wire.RouteInfo:
    """Add a route on a host; a route to a task the host does not run is refused."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    spec = {k: v for k, v in body.items() if k != "host"}
    name = str(spec.get("name") or "")
    with st.store.session() as s:
        if s.scalar(select(RouteRow).where(RouteRow.account_id == acct_id, RouteRow.name == name)):
            raise Conflict(f"route {name!r} already exists")
    wanted = body.get("host")
    if wanted is None and spec.get("source_device"):
        with st.store.session() as s:
            wanted = _device_row(s, acct_id, str(spec["source_device"])).host
    host = pick_host(st, wanted)
    out = await st.links.call(host, "routes.add", {"account": acct, "route": spec})
    now = st.clock()
    with st.store.session() as s:
        s.add(RouteRow(account_id=acct_id, name=name, host=host, spec=out, created_at=now))
        repos.add_event(s, "route.added", now, subject=name, account_id=acct_id,
                        data={"host": host})  # fmt: skip
    return _route_out(out, host)


@router.get("/routes", response_model=list[wire.RouteInfo])
def list_routes(request: Request, p: Auth, account: AccountQ = None) -> list[wire.RouteInfo]:
    st = state_of(request)
    acct_id, _ = account_of(st, p, account)
    with st.store.session() as s:
        rows = s.scalars(
            select(RouteRow).where(RouteRow.account_id == acct_id).order_by(RouteRow.name)
        )
        return [_route_out(r.spec, r.host) for r in rows]


@router.delete("/routes/{name}", status_code=204)
async def remove_route(name: str, request: Request, p: Auth, account: AccountQ = None) -> None:
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        row = s.scalar(
            select(RouteRow).where(RouteRow.account_id == acct_id, RouteRow.name == name)
        )
        if row is None:
            raise NotFound(f"route {name!r} not found")
        host = row.host
    with contextlib.suppress(NotFound):  # already gone on the host
        await st.links.call(host, "routes.remove", {"account": acct, "name": name})
    with st.store.session() as s:
        row = s.scalar(
            select(RouteRow).where(RouteRow.account_id == acct_id, RouteRow.name == name)
        )
        if row is not None:
            s.delete(row)
        repos.add_event(s, "route.removed", st.clock(), subject=name, account_id=acct_id)


@router.post("/timers", response_model=wire.TimerInfo, status_code=201)
async def add_timer(
    request: Request,
    p: Auth,
    account: AccountQ = None,
    body: Annotated[dict[str, Any], Body()] = ...,  # type: ignore[assignment]
) -> wire.TimerInfo:
    """A cron timer that calls one of the account's tasks on a host."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    spec = {k: v for k, v in body.items() if k != "host"}
    name = str(spec.get("name") or "")
    with st.store.session() as s:
        if s.scalar(select(TimerRow).where(TimerRow.account_id == acct_id, TimerRow.name == name)):
            raise Conflict(f"timer {name!r} already exists")
    host = pick_host(st, body.get("host"))
    out = await st.links.call(host, "timers.add", {"account": acct, "timer": spec})
    now = st.clock()
    with st.store.session() as s:
        s.add(TimerRow(account_id=acct_id, name=name, host=host, spec=out, created_at=now))
    return wire.TimerInfo.model_validate({**out, "host": host})


@router.get("/timers", response_model=list[wire.TimerInfo])
async def list_timers(request: Request, p: Auth, account: AccountQ = None) -> list[wire.TimerInfo]:
    """Timers with their next run as the host reports it (the stored copy if it is away)."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        rows = [
            (r.name, r.host, dict(r.spec))
            for r in s.scalars(
                select(TimerRow).where(TimerRow.account_id == acct_id).order_by(TimerRow.name)
            )
        ]
    live: dict[tuple[str, str], dict[str, Any]] = {}
    for host in sorted({h for _, h, _ in rows}):
        try:
            for t in await st.links.call(host, "timers.list", {"account": acct}):
                live[(host, t["name"])] = t
        except (PeerUnavailable, UnavailableError):
            continue
    return [
        wire.TimerInfo.model_validate({**live.get((host, name), spec), "host": host})
        for name, host, spec in rows
    ]


@router.delete("/timers/{name}", status_code=204)
async def remove_timer(name: str, request: Request, p: Auth, account: AccountQ = None) -> None:
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        row = s.scalar(
            select(TimerRow).where(TimerRow.account_id == acct_id, TimerRow.name == name)
        )
        if row is None:
            raise NotFound(f"timer {name!r} not found")
        host = row.host
    with contextlib.suppress(NotFound):  # already gone on the host
        await st.links.call(host, "timers.remove", {"account": acct, "name": name})
    with st.store.session() as s:
        row = s.scalar(
            select(TimerRow).where(TimerRow.account_id == acct_id, TimerRow.name == name)
        )
        if row is not None:
            s.delete(row)


# --- shadows -------------------------------------------------------------------------------


def _shadow_row(s: Session, account_id: int, device: str) -> ShadowRow | None:
    return s.scalar(
        select(ShadowRow).where(ShadowRow.account_id == account_id, ShadowRow.device == device)
    )


def _store_shadow(
    s: Session, account_id: int, doc: dict[str, Any], now: float, *, pending: bool
) -> ShadowRow:
    row = _shadow_row(s, account_id, str(doc["device"]))
    if row is None:
        row = ShadowRow(account_id=account_id, device=str(doc["device"]))
        s.add(row)
    row.version = int(doc["version"])
    row.doc = doc
    row.pending = 1 if pending else 0
    row.synced_at = now
    return row


def _shadow_out(doc: dict[str, Any], pending: bool) -> wire.ShadowInfo:
    return wire.ShadowInfo.model_validate({**doc, "pending": pending})


@router.get("/shadows/{device}", response_model=wire.ShadowInfo)
async def get_shadow(
    device: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.ShadowInfo:
    """The host's shadow; the controller's last copy when the host is unreachable."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        host = _device_row(s, acct_id, device).host
        row = _shadow_row(s, acct_id, device)
        cached = (dict(row.doc), bool(row.pending)) if row is not None else None
    if cached is not None and cached[1]:
        return _shadow_out(*cached)
    try:
        doc = await st.links.call(host, "shadows.get", {"account": acct, "device": device})
    except (PeerUnavailable, UnavailableError):
        if cached is None:
            raise
        return _shadow_out(*cached)
    return _shadow_out(doc, False)


@router.post("/shadows/{device}", response_model=wire.ShadowInfo)
async def update_shadow(
    device: str,
    request: Request,
    p: Auth,
    account: AccountQ = None,
    body: Annotated[dict[str, Any], Body()] = ...,  # type: ignore[assignment]
) -> wire.ShadowInfo:
    """Patch ``state.desired``/``state.reported``; a stale ``version`` is a 409."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    state = body.get("state") or {}
    if not isinstance(state, dict):
        raise RequestError("'state' must be an object")
    desired, reported, version = state.get("desired"), state.get("reported"), body.get("version")
    with st.store.session() as s:
        host = _device_row(s, acct_id, device).host
        row = _shadow_row(s, acct_id, device)
        pending = row is not None and bool(row.pending)
    if not pending:
        payload = {"account": acct, "device": device, "desired": desired,
                   "reported": reported, "version": version}  # fmt: skip
        try:
            doc = await st.links.call(host, "shadows.update", payload)
        except (PeerUnavailable, UnavailableError):
            pass  # the host is away: change the controller's copy, the host pulls it later
        else:
            with st.store.session() as s:
                _store_shadow(s, acct_id, doc, st.clock(), pending=False)
            return _shadow_out(doc, False)
    if reported is not None:
        raise PeerUnavailable(f"host {host!r} is unreachable; only 'desired' can change now")
    with st.store.session() as s:
        row = _shadow_row(s, acct_id, device)
        current = Shadow.from_json(row.doc) if row is not None else Shadow(device)
        try:
            new = apply_update(
                current, desired=desired, reported=None,
                expected_version=int(version) if version is not None else None, now=st.clock(),
            )  # fmt: skip
        except Conflict as exc:  # as a plain Conflict, so every client can rebuild it
            raise Conflict(exc.message, details=exc.details) from exc
        doc = new.to_json()
        _store_shadow(s, acct_id, doc, st.clock(), pending=True)
    return _shadow_out(doc, True)


# --- messages taken in from agents ---------------------------------------------------------


@router.get("/device-messages", response_model=list[wire.DeviceMessageInfo])
def device_messages(
    request: Request,
    p: Auth,
    account: AccountQ = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[wire.DeviceMessageInfo]:
    """Messages routed to the controller and shadow syncs, oldest first, after an id."""
    st = state_of(request)
    acct_id, _ = account_of(st, p, account)
    with st.store.session() as s:
        rows = s.scalars(
            select(DeviceMessage)
            .where(DeviceMessage.account_id == acct_id, DeviceMessage.id > after)
            .order_by(DeviceMessage.id)
            .limit(limit)
        )
        return [
            wire.DeviceMessageInfo(id=r.id, host=r.host, seq=r.seq, kind=r.kind, body=r.body,
                                   spooled_at=r.spooled_at, received_at=r.received_at)
            for r in rows
        ]  # fmt: skip


def _same_host(host: str, path_host: str) -> None:
    if host != path_host:
        raise Forbidden(f"host {host!r} may not act for host {path_host!r}")


def _account_ids(s: Session) -> dict[str, int]:
    return {a.name: a.id for a in repos.list_accounts(s)}


@router.post("/hosts/{name}/devices/intake", include_in_schema=False)
def intake(
    name: str,
    request: Request,
    host: HostAuth,
    body: Annotated[dict[str, Any], Body()],
) -> dict[str, Any]:
    """An agent delivers spooled items, oldest first; known items are skipped."""
    _same_host(host, name)
    st = state_of(request)
    items = body.get("items")
    if not isinstance(items, list):
        raise RequestError("'items' must be a list")
    now = st.clock()
    stored = 0
    with st.store.session() as s:
        ids = _account_ids(s)
        for it in items:
            seq, spooled_at = int(it["seq"]), float(it["created_at"])
            kind, doc = str(it["kind"]), dict(it["body"])
            if s.scalar(
                select(DeviceMessage.id).where(
                    DeviceMessage.host == host,
                    DeviceMessage.seq == seq,
                    DeviceMessage.spooled_at == spooled_at,
                )
            ):
                continue
            source = doc.get("device") if kind == "shadow" else doc.get("source") or doc.get("task")
            acct_name, bare = split(str(source or ""))
            acct_id = ids.get(acct_name)
            if kind == "shadow" and acct_id is not None:
                doc = {**doc, "device": bare}
                _sync_shadow(s, acct_id, doc, now)
            elif kind == "message":
                if doc.get("source"):
                    doc["source"] = bare
                if doc.get("task"):
                    doc["task"] = split(str(doc["task"]))[1]
            s.add(DeviceMessage(host=host, seq=seq, account_id=acct_id, kind=kind, body=doc,
                                spooled_at=spooled_at, received_at=now))  # fmt: skip
            s.flush()
            repos.add_event(s, f"device.{kind}", now, subject=bare or host, account_id=acct_id,
                            data={"host": host, "seq": seq, "body": doc})  # fmt: skip
            stored += 1
    return {"accepted": len(items), "stored": stored}


def _sync_shadow(s: Session, account_id: int, agent_doc: dict[str, Any], now: float) -> None:
    row = _shadow_row(s, account_id, str(agent_doc["device"]))
    if row is not None and row.pending:
        merged = reconcile(Shadow.from_json(agent_doc), Shadow.from_json(row.doc))
        _store_shadow(s, account_id, merged.to_json(), now, pending=True)
    elif row is None or int(agent_doc["version"]) >= row.version:
        _store_shadow(s, account_id, agent_doc, now, pending=False)


@router.get("/hosts/{name}/shadows", include_in_schema=False)
def pending_shadows(name: str, request: Request, host: HostAuth) -> list[dict[str, Any]]:
    """Shadows changed on the controller while the host was away (qualified names)."""
    _same_host(host, name)
    st = state_of(request)
    out: list[dict[str, Any]] = []
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        devices = {
            (d.account_id, d.name)
            for d in s.scalars(select(DeviceRow).where(DeviceRow.host == host))
        }
        for row in s.scalars(select(ShadowRow).where(ShadowRow.pending == 1)):
            if (row.account_id, row.device) not in devices:
                continue
            out.append({**row.doc, "device": qualified(names[row.account_id], row.device)})
            row.pending = 0  # the agent merges it now; its own sync brings the result back
    return out


@router.get("/hosts/{name}/devices/stats")
async def device_stats(name: str, request: Request, p: Auth) -> dict[str, Any]:
    """A host's device counters: messages, calls, dead letters, broker refusals and
    ACL drops per device, spool depth and losses (dropped/rejected). Admin only: the counters
    name every account's devices."""
    p.require_admin()
    st = state_of(request)
    stats: dict[str, Any] = await st.links.call(pick_host(st, name), "devices.stats", {})
    return stats
