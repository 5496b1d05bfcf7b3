"""Deployments on the controller: versioned per account and host (a list of hosts is a
host group: one row per host, each with its own version and status).

A deployment names tasks (bundles, stored in table ``bundles`` by content digest, with
manifest overrides), devices, routes, timers and free-form settings. ``POST
/v1/deployments`` checks every bundle and route, stores the bundles, and creates version
``n+1`` for each target host in state ``pending``; older versions still pending or applying
there become ``cancelled`` (superseded). The controller then pokes the host; the agent pulls
(``GET /v1/hosts/<host>/deployments``), applies step by step and reports each step
(``POST .../status``; the steps and the rollback rule are in :mod:`edgevisor.agent.devices`).

States: ``pending`` -> ``applying`` -> ``succeeded`` | ``failed`` (rolled back, failing step
named) | ``cancelled``. ``POST /v1/deployments/cancel`` always works: the row becomes
``cancelled`` at once (so a host that is away will not start it), and a reachable host
interrupts the step it is on and rolls back. If the agent finished before the cancel
reached it, its ``succeeded`` report wins: the row says what the host runs.

When a version succeeds, its devices, routes and timers are recorded in the account's
tables (so ``device list`` and shadows find them).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgevisor.agent.devices import qualify_route
from edgevisor.control.api_devices import account_of, pick_host
from edgevisor.control.api_tasks import _check_bundle
from edgevisor.control.auth import Principal, require_host, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import EdgevisorError, Forbidden, NotFound, RequestError
from edgevisor.sdk import devices as wire
from edgevisor.store import repos
from edgevisor.store.device_models import Deployment, DeviceRow, RouteRow, ShadowRow, TimerRow
from edgevisor.store.models import Account
from edgevisor.store.task_models import Bundle, Task

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
HostAuth = Annotated[str, Depends(require_host)]
ACTIVE = ("pending", "applying")


def _out(d: Deployment, account: str) -> wire.DeploymentInfo:
    return wire.DeploymentInfo(
        account=account, host=d.host, version=d.version, state=d.state,
        steps=[wire.DeploymentStep.model_validate(x) for x in d.steps],
        failed_step=d.failed_step, error=d.error, spec=d.spec,
        created_at=d.created_at, updated_at=d.updated_at,
    )  # fmt: skip


def _hosts(st: ControllerState, wanted: list[str]) -> list[str]:
    if wanted:
        return [pick_host(st, h) for h in wanted]
    with st.store.session() as s:
        up = sorted(h.name for h in repos.list_hosts(s) if h.state == "up")
    return up or [pick_host(st, None)]


def _reference(st: ControllerState, acct_id: int, i: int, t: dict[str, Any]) -> dict[str, Any]:
    """A task given by name (the account's current version) or by name + bundle digest.

    A digest is not checked here: the host fetches it, and a missing bundle fails that
    step (``fetch task X``) and rolls the version back, as any other failing step.
    """
    name = str(t.get("name") or "")
    if not name:
        raise RequestError(f"tasks[{i}]: give 'archive_b64', or 'name' (and 'bundle')")
    if t.get("bundle"):
        return {"name": name, "bundle": str(t["bundle"]),
                "overrides": dict(t.get("overrides") or {})}  # fmt: skip
    with st.store.session() as s:
        row = s.scalar(select(Task).where(Task.account_id == acct_id, Task.name == name))
        if row is None:
            raise NotFound(f"tasks[{i}]: the account has no task named {name!r}")
        overrides = {**row.overrides, **dict(t.get("overrides") or {})}
        return {"name": name, "bundle": row.bundle_digest, "overrides": overrides}


def _prepare(st: ControllerState, acct_id: int, acct: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check the request and store its bundles; returns the spec kept with each version."""
    tasks: list[dict[str, Any]] = []
    now = st.clock()
    for i, t in enumerate(body.get("tasks") or []):
        if "archive_b64" not in t:
            tasks.append(_reference(st, acct_id, i, t))
            continue
        try:
            archive = base64.b64decode(str(t["archive_b64"]), validate=True)
        except (TypeError, binascii.Error) as exc:
            raise RequestError(f"tasks[{i}]: 'archive_b64' must be the bundle in base64") from exc
        overrides = dict(t.get("overrides") or {})
        if t.get("name"):
            overrides["name"] = str(t["name"])
        name, digest = _check_bundle(st, archive, overrides)
        overrides.pop("name", None)
        with st.store.session() as s:
            if s.get(Bundle, digest) is None:
                s.add(Bundle(digest=digest, size_bytes=len(archive), data=archive, created_at=now))
        tasks.append({"name": name, "bundle": digest, "overrides": overrides})
    names = [t["name"] for t in tasks]
    if len(set(names)) != len(names):
        raise RequestError("a task is named twice in the deployment")
    with st.store.session() as s:
        known = set(s.scalars(select(Task.name).where(Task.account_id == acct_id)))
    routes = list(body.get("routes") or [])
    for r in routes:
        route = qualify_route(acct, dict(r))  # names, topics, shape
        task = route.destination.task if hasattr(route.destination, "task") else None
        if task is not None:
            bare = task.partition(".")[2]
            if bare not in names and bare not in known:
                raise RequestError(f"route {r.get('name')!r}: no task named {bare!r}")
    for tm in body.get("timers") or []:
        if str(tm.get("task")) not in names and str(tm.get("task")) not in known:
            raise RequestError(f"timer {tm.get('name')!r}: no task named {tm.get('task')!r}")
    return {
        "account": acct,
        "tasks": tasks,
        "devices": list(body.get("devices") or []),
        "routes": routes,
        "timers": list(body.get("timers") or []),
        "settings": dict(body.get("settings") or {}),
    }


def _latest(s: Session, acct_id: int, host: str) -> Deployment | None:
    return s.scalar(
        select(Deployment)
        .where(Deployment.account_id == acct_id, Deployment.host == host)
        .order_by(Deployment.version.desc())
        .limit(1)
    )


async def _poke(st: ControllerState, host: str) -> None:
    with contextlib.suppress(EdgevisorError):
        await st.links.call(host, "deployment.poke", {}, timeout_s=5)


@router.post("/deployments", response_model=list[wire.DeploymentInfo], status_code=201)
async def apply(
    request: Request,
    p: Auth,
    account: Annotated[str | None, Query()] = None,
    body: Annotated[dict[str, Any], Body()] = ...,  # type: ignore[assignment]
) -> list[wire.DeploymentInfo]:
    """Create the next version for each target host (``hosts``; empty: every host up)."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    spec = _prepare(st, acct_id, acct, body)
    hosts = _hosts(st, [str(h) for h in body.get("hosts") or []])
    now = st.clock()
    out: list[wire.DeploymentInfo] = []
    with st.store.session() as s:
        for host in hosts:
            top = s.scalar(
                select(func.max(Deployment.version)).where(
                    Deployment.account_id == acct_id, Deployment.host == host
                )
            )
            version = int(top or 0) + 1
            for old in s.scalars(
                select(Deployment).where(
                    Deployment.account_id == acct_id,
                    Deployment.host == host,
                    Deployment.state.in_(ACTIVE),
                )
            ):
                old.state, old.error, old.updated_at = "cancelled", f"superseded by v{version}", now
            d = Deployment(account_id=acct_id, host=host, version=version, spec=spec,
                           state="pending", steps=[], created_at=now, updated_at=now)  # fmt: skip
            s.add(d)
            s.flush()
            repos.add_event(s, "deployment.pending", now, subject=host, account_id=acct_id,
                            data={"version": version})  # fmt: skip
            out.append(_out(d, acct))
    for host in hosts:
        await _poke(st, host)
    return out


@router.get("/deployments", response_model=list[wire.DeploymentInfo])
def status(
    request: Request,
    p: Auth,
    account: Annotated[str | None, Query()] = None,
    host: Annotated[str | None, Query()] = None,
    history: Annotated[bool, Query(description="Every version, not only the latest.")] = False,
) -> list[wire.DeploymentInfo]:
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    with st.store.session() as s:
        q = select(Deployment).where(Deployment.account_id == acct_id)
        if host is not None:
            q = q.where(Deployment.host == host)
        rows = list(s.scalars(q.order_by(Deployment.host, Deployment.version.desc())))
        if not history:
            latest: dict[str, Deployment] = {}
            for r in rows:  # ordered newest first per host
                latest.setdefault(r.host, r)
            rows = list(latest.values())
        return [_out(r, acct) for r in rows]


@router.post("/deployments/cancel", response_model=list[wire.DeploymentInfo])
async def cancel(
    request: Request,
    p: Auth,
    account: Annotated[str | None, Query()] = None,
    host: Annotated[str | None, Query()] = None,
) -> list[wire.DeploymentInfo]:
    """Cancel the account's pending or applying versions (on one host or all)."""
    st = state_of(request)
    acct_id, acct = account_of(st, p, account)
    now = st.clock()
    targets: list[tuple[str, int]] = []
    with st.store.session() as s:
        q = select(Deployment).where(Deployment.account_id == acct_id, Deployment.state.in_(ACTIVE))
        if host is not None:
            q = q.where(Deployment.host == host)
        for d in s.scalars(q):
            d.state, d.error, d.updated_at = "cancelled", "cancelled by request", now
            targets.append((d.host, d.version))
            repos.add_event(s, "deployment.cancelled", now, subject=d.host, account_id=acct_id,
                            data={"version": d.version})  # fmt: skip
    for h, version in targets:
        with contextlib.suppress(EdgevisorError):  # an absent host learns it when it polls
            await st.links.call(
                h, "deployment.cancel", {"account": acct, "version": version}, timeout_s=90
            )
    out: list[wire.DeploymentInfo] = []
    with st.store.session() as s:
        for h, version in targets:
            row = s.scalar(select(Deployment).where(
                Deployment.account_id == acct_id, Deployment.host == h,
                Deployment.version == version))  # fmt: skip
            if row is not None:
                out.append(_out(row, acct))
    return out


# --- the agent's side ----------------------------------------------------------------------


def _same_host(host: str, path_host: str) -> None:
    if host != path_host:
        raise Forbidden(f"host {host!r} may not act for host {path_host!r}")


@router.get("/hosts/{name}/deployments", include_in_schema=False)
def wanted(name: str, request: Request, host: HostAuth) -> list[dict[str, Any]]:
    """The latest version of each account's deployment to this host."""
    _same_host(host, name)
    st = state_of(request)
    out: list[dict[str, Any]] = []
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        ids = set(s.scalars(select(Deployment.account_id).where(Deployment.host == host)))
        for acct_id in sorted(ids):
            d = _latest(s, acct_id, host)
            if d is not None and acct_id in names:
                out.append({"account": names[acct_id], "version": d.version, "state": d.state,
                            "spec": d.spec})  # fmt: skip
    return out


@router.get("/hosts/{name}/bundles/{digest}", include_in_schema=False)
def bundle(name: str, digest: str, request: Request, host: HostAuth) -> dict[str, Any]:
    _same_host(host, name)
    st = state_of(request)
    with st.store.session() as s:
        b = s.get(Bundle, digest)
        if b is None:
            raise NotFound(f"bundle {digest} not found")
        return {"digest": digest, "archive_b64": base64.b64encode(b.data).decode()}


@router.post("/hosts/{name}/deployments/{account}/{version}/status", include_in_schema=False)
def report(
    name: str,
    account: str,
    version: int,
    request: Request,
    host: HostAuth,
    body: Annotated[dict[str, Any], Body()],
) -> dict[str, Any]:
    """The agent's progress: state, steps, failing step."""
    _same_host(host, name)
    st = state_of(request)
    now = st.clock()
    with st.store.session() as s:
        acct = repos.get_account(s, account)
        d = s.scalar(select(Deployment).where(
            Deployment.account_id == acct.id, Deployment.host == host,
            Deployment.version == version))  # fmt: skip
        if d is None:
            raise NotFound(f"deployment v{version} of {account} on {host} not found")
        state = str(body.get("state"))
        if state not in ("applying", "succeeded", "failed", "cancelled"):
            raise RequestError(f"unknown deployment state {state!r}")
        was_cancelled = d.state == "cancelled"
        if not (was_cancelled and state == "applying"):
            d.state = state
        d.steps = list(body.get("steps") or [])
        d.failed_step = body.get("failed_step")
        if state == "succeeded":
            d.error = None
        elif not (was_cancelled and state in ("applying", "cancelled") and d.error):
            d.error = body.get("error")  # keep the controller's reason for a cancel
        d.updated_at = now
        if state == "succeeded":
            _drop_previous(s, acct, host, version, d.spec)
            _record(s, acct, host, d.spec, now)
            _record_tasks(s, acct, host, d.spec, list(body.get("tasks") or []), now)
        if state != "applying":
            repos.add_event(s, f"deployment.{state}", now, subject=host, account_id=acct.id,
                            data={"version": version, "failed_step": d.failed_step})  # fmt: skip
        return {"state": d.state}


def _record_tasks(
    s: Session,
    acct: Account,
    host: str,
    spec: dict[str, Any],
    tasks: list[dict[str, Any]],
    now: float,
) -> None:
    """Make ``task list`` show the versions the host now runs (as ``task deploy`` does)."""
    overrides = {t["name"]: dict(t.get("overrides") or {}) for t in spec.get("tasks", [])}
    for t in tasks:
        name = str(t["name"])
        if s.get(Bundle, str(t["bundle"])) is None:
            continue  # not a bundle this controller holds; nothing to point the row at
        row = s.scalar(select(Task).where(Task.account_id == acct.id, Task.name == name))
        if row is None:
            row = Task(account_id=acct.id, name=name, hosts=[])
            s.add(row)
        row.version = str(t["version"])
        row.bundle_digest = str(t["bundle"])
        row.spec = dict(t["spec"])
        row.overrides = overrides.get(name, {})
        row.hosts = sorted(set(row.hosts or []) | {host})
        row.deployed_at = now


def _drop_previous(
    s: Session, acct: Account, host: str, version: int, spec: dict[str, Any]
) -> None:
    """Forget the devices, routes and timers the previous good version on ``host`` had and
    this one drops (the agent removed them: step ``remove old devices`` and the route and
    timer replacement); rows of the same name on another host are not this version's."""
    prev = s.scalar(
        select(Deployment)
        .where(Deployment.account_id == acct.id, Deployment.host == host,
               Deployment.state == "succeeded", Deployment.version < version)
        .order_by(Deployment.version.desc())
        .limit(1)
    )  # fmt: skip
    if prev is None:
        return

    def dropped(kind: str) -> set[str]:
        keep = {str(x["name"]) for x in spec.get(kind, [])}
        return {str(x["name"]) for x in prev.spec.get(kind, [])} - keep

    for table, kind in ((DeviceRow, "devices"), (RouteRow, "routes"), (TimerRow, "timers")):
        for name in dropped(kind):
            row = s.scalar(select(table).where(table.account_id == acct.id, table.name == name,
                                               table.host == host))  # fmt: skip
            if row is not None:
                s.delete(row)
                if kind == "devices":
                    shadow = s.scalar(select(ShadowRow).where(
                        ShadowRow.account_id == acct.id, ShadowRow.device == name))  # fmt: skip
                    if shadow is not None:
                        s.delete(shadow)


def _record(s: Session, acct: Account, host: str, spec: dict[str, Any], now: float) -> None:
    """Make the account's tables show what a succeeded version put on the host."""
    for dev in spec.get("devices", []):
        name = str(dev["name"])
        if s.scalar(select(DeviceRow).where(DeviceRow.account_id == acct.id,
                                            DeviceRow.name == name)) is None:  # fmt: skip
            s.add(DeviceRow(account_id=acct.id, name=name, host=host, created_at=now))
    for item in spec.get("routes", []):
        route = s.scalar(select(RouteRow).where(RouteRow.account_id == acct.id,
                                                RouteRow.name == str(item["name"])))  # fmt: skip
        if route is None:
            route = RouteRow(account_id=acct.id, name=str(item["name"]), created_at=now)
            s.add(route)
        route.host, route.spec = host, dict(item)
    for item in spec.get("timers", []):
        timer = s.scalar(select(TimerRow).where(TimerRow.account_id == acct.id,
                                                TimerRow.name == str(item["name"])))  # fmt: skip
        if timer is None:
            timer = TimerRow(account_id=acct.id, name=str(item["name"]), created_at=now)
            s.add(timer)
        timer.host, timer.spec = host, dict(item)
