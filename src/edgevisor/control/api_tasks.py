"""Tasks and calls: ``/v1/tasks``, ``/v1/tasks/{name}/invoke``, ``/v1/calls/{id}``.

A deploy is checked here first (archive safety, manifest), then sent to each target host's
coordinator; if any host refuses, the hosts that took it are put back as they were, so a
failed deploy leaves no host on a half-deployed version. Calls run on one host's
coordinator; a call id names its host (``<host>:<id>``) so ``call show`` needs no lookup.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgevisor.control.auth import Principal, acting_account, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import (
    EdgevisorError,
    NotFound,
    PeerUnavailable,
    RequestError,
    UnavailableError,
)
from edgevisor.sdk import tasks as wire
from edgevisor.store import repos
from edgevisor.store.models import Account
from edgevisor.store.task_models import Bundle, Task
from edgevisor.tasks.bundles import BundleStore, digest_entries
from edgevisor.tasks.spec import SpecError, parse_manifest

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
MANIFEST = "edgevisor.toml"


def _check_bundle(
    st: ControllerState, archive: bytes, overrides: dict[str, Any]
) -> tuple[str, str]:
    """Read the archive safely and validate its manifest; returns (task name, digest)."""
    with tempfile.TemporaryDirectory() as tmp:
        entries = BundleStore(
            Path(tmp), max_bytes=st.settings.coordinator.bundle_max_bytes
        ).read_entries(archive)
    manifest = next((e for e in entries if e.path == MANIFEST and e.kind == "f"), None)
    if manifest is None:
        raise SpecError("manifest", f"the bundle has no {MANIFEST} at its top level")
    try:
        data = tomllib.loads(manifest.data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError("manifest", f"{MANIFEST} is not valid TOML: {exc}") from exc
    spec = parse_manifest(data, overrides)
    return spec.name, digest_entries(entries)


def _target_hosts(st: ControllerState, wanted: list[str]) -> list[str]:
    with st.store.session() as s:
        hosts = {h.name: h.state for h in repos.list_hosts(s)}
    if wanted:
        for h in wanted:
            if h not in hosts:
                raise NotFound(f"host {h!r} not found")
            if hosts[h] != "up":
                raise PeerUnavailable(f"host {h!r} is down")
        return wanted
    up = sorted(h for h, state in hosts.items() if state == "up")
    if not up:
        raise UnavailableError("no host is up to deploy to")
    return up


def _task_out(t: Task, account: str) -> wire.TaskInfo:
    return wire.TaskInfo(
        name=t.name,
        account=account,
        version=t.version,
        bundle=t.bundle_digest,
        spec=t.spec,
        hosts=list(t.hosts),
        deployed_at=t.deployed_at,
    )


async def _deploy_to(
    st: ControllerState,
    host: str,
    account: str,
    name: str,
    archive: bytes,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    payload = {
        "account": account,
        "name": name,
        "archive_b64": base64.b64encode(archive).decode(),
        "overrides": overrides,
    }
    result: dict[str, Any] = await st.links.call(host, "tasks.deploy", payload, timeout_s=120)
    return result


@router.post("/tasks", response_model=wire.TaskInfo, status_code=201)
async def deploy_task(
    request: Request,
    p: Auth,
    account: Annotated[str | None, Query()] = None,
    name: Annotated[str | None, Query(description="Override the manifest's name.")] = None,
    memory: Annotated[str | None, Query(description="e.g. 128M")] = None,
    cpu: Annotated[float | None, Query(gt=0)] = None,
    timeout: Annotated[str | None, Query(description="e.g. 3s")] = None,
    concurrency: Annotated[int | None, Query(ge=1)] = None,
    host: Annotated[list[str] | None, Query()] = None,
) -> wire.TaskInfo:
    """Deploy a bundle (.tar.gz or .zip bytes as the request body)."""
    st = state_of(request)
    acct = await run_in_threadpool(acting_account, st, p, account)
    archive = await request.body()
    if not archive:
        raise RequestError("the request body must be the bundle (.tar.gz or .zip)")
    overrides = {
        k: v
        for k, v in {
            "name": name,
            "memory": memory,
            "cpu": cpu,
            "timeout": timeout,
            "concurrency": concurrency,
        }.items()
        if v is not None
    }
    task_name, _digest = await run_in_threadpool(_check_bundle, st, archive, overrides)
    overrides.pop("name", None)
    hosts = await run_in_threadpool(_target_hosts, st, host or [])
    with st.store.session() as s:
        prev = s.scalar(select(Task).where(Task.account_id == acct.id, Task.name == task_name))
        previous = (prev.bundle_digest, dict(prev.overrides), list(prev.hosts)) if prev else None
        prev_archive = s.get(Bundle, prev.bundle_digest).data if prev else None  # type: ignore[union-attr]
    done: list[str] = []
    result: dict[str, Any] = {}
    try:
        for h in hosts:
            result = await _deploy_to(st, h, acct.name, task_name, archive, overrides)
            done.append(h)
    except EdgevisorError as exc:
        await _undo(st, done, acct.name, task_name, previous, prev_archive)
        where = hosts[len(done)]
        # Same class (callers branch on it), with the host named in the message.
        exc.message = f"deploy to host {where!r} failed: {exc.message}"
        exc.args = (exc.message,)
        raise
    now = st.clock()
    with st.store.session() as s:
        digest = str(result["bundle"])
        if s.get(Bundle, digest) is None:
            s.add(Bundle(digest=digest, size_bytes=len(archive), data=archive, created_at=now))
        t = s.scalar(select(Task).where(Task.account_id == acct.id, Task.name == task_name))
        if t is None:
            t = Task(account_id=acct.id, name=task_name)
            s.add(t)
        t.version = str(result["version"])
        t.bundle_digest = digest
        t.spec = dict(result["spec"])
        t.overrides = overrides
        t.hosts = sorted(set(hosts) | set(previous[2] if previous else []))
        t.deployed_at = now
        s.flush()
        _route_cache(request).clear()
        repos.add_event(
            s, "task.deployed", now, subject=task_name, account_id=acct.id,
            data={"version": t.version, "hosts": hosts},
        )  # fmt: skip
        return _task_out(t, acct.name)


async def _undo(
    st: ControllerState,
    hosts: list[str],
    account: str,
    name: str,
    previous: tuple[str, dict[str, Any], list[str]] | None,
    prev_archive: bytes | None,
) -> None:
    """Put hosts that took a failed deploy back to the previous version (or none)."""
    for h in hosts:
        try:
            if previous is not None and prev_archive is not None and h in previous[2]:
                await _deploy_to(st, h, account, name, prev_archive, previous[1])
            else:
                await st.links.call(h, "tasks.remove", {"account": account, "name": name})
        except EdgevisorError:
            pass  # the host is unreachable now; the controller's record still says "previous"


@router.get("/tasks", response_model=list[wire.TaskInfo])
def list_tasks(request: Request, p: Auth) -> list[wire.TaskInfo]:
    st = state_of(request)
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        q = select(Task).order_by(Task.name)
        if not p.admin:
            q = q.where(Task.account_id == p.account_id)
        return [_task_out(t, names[t.account_id]) for t in s.scalars(q)]


def _task(st: ControllerState, acct: Account, name: str) -> Task:
    with st.store.session() as s:
        t = s.scalar(select(Task).where(Task.account_id == acct.id, Task.name == name))
        if t is None:
            raise NotFound(f"task {name!r} not found in account {acct.name!r}")
        return t


@router.get("/tasks/{name}", response_model=wire.TaskInfo)
def get_task(
    name: str, request: Request, p: Auth, account: Annotated[str | None, Query()] = None
) -> wire.TaskInfo:
    st = state_of(request)
    acct = acting_account(st, p, account)
    return _task_out(_task(st, acct, name), acct.name)


@router.delete("/tasks/{name}", status_code=204)
async def remove_task(
    name: str, request: Request, p: Auth, account: Annotated[str | None, Query()] = None
) -> None:
    st = state_of(request)
    acct = await run_in_threadpool(acting_account, st, p, account)
    t = await run_in_threadpool(_task, st, acct, name)
    for h in t.hosts:
        with contextlib.suppress(NotFound):  # already gone there
            await st.links.call(h, "tasks.remove", {"account": acct.name, "name": name})
    with st.store.session() as s:
        row = s.get(Task, t.id)
        if row is not None:
            s.delete(row)
        repos.add_event(s, "task.removed", st.clock(), subject=name, account_id=acct.id)
    _route_cache(request).clear()


def _pick_host(st: ControllerState, t: Task, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in t.hosts:
            raise NotFound(f"task {t.name!r} is not deployed on host {wanted!r}")
        return wanted
    with st.store.session() as s:
        up = {h.name for h in repos.list_hosts(s) if h.state == "up"}
    for h in sorted(t.hosts):
        if h in up:
            return h
    raise PeerUnavailable(f"no host running task {t.name!r} is up")


ROUTE_TTL_S = 1.0
RouteKey = tuple[int, str | None, str, str | None]


def _route_cache(request: Request) -> dict[RouteKey, tuple[float, tuple[str, float, str]]]:
    cache: dict[RouteKey, tuple[float, tuple[str, float, str]]] | None = getattr(
        request.app.state, "route_cache", None
    )
    if cache is None:
        cache = request.app.state.route_cache = {}
    return cache


def _route(
    st: ControllerState, p: Principal, account: str | None, name: str, host: str | None
) -> tuple[str, float, str]:
    """(account name, task timeout, host to run on) for an invoke."""
    acct = acting_account(st, p, account)
    t = _task(st, acct, name)
    return acct.name, float(t.spec.get("timeout_s", 3.0)), _pick_host(st, t, host)


@router.post(
    "/tasks/{name}/invoke",
    response_model=wire.CallInfo,
    responses={202: {"model": wire.CallAccepted}},
)
async def invoke(
    name: str,
    request: Request,
    p: Auth,
    account: Annotated[str | None, Query()] = None,
    async_: Annotated[bool, Query(alias="async")] = False,
    host: Annotated[str | None, Query()] = None,
    priority: Annotated[int | None, Query(ge=-100, le=100)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> Any:
    """Call a task with the request body (JSON) as its event."""
    st = state_of(request)
    raw = await request.body()
    try:
        event = json.loads(raw) if raw.strip() else None
    except ValueError as exc:
        raise RequestError(f"malformed JSON at position {getattr(exc, 'pos', '?')}: {exc}") from exc
    # Where a call goes changes only on deploy/remove or a host going down; a short-lived
    # cache keeps the store out of the hot path. Lookups run off the event loop, which
    # also runs the local coordinator.
    cache = _route_cache(request)
    key = (p.token_id, account, name, host)
    hit = cache.get(key)
    if hit is not None and hit[0] > time.monotonic():
        acct_name, timeout_s, h = hit[1]
    else:
        acct_name, timeout_s, h = await run_in_threadpool(_route, st, p, account, name, host)
        if len(cache) > 10_000:
            cache.clear()
        cache[key] = (time.monotonic() + ROUTE_TTL_S, (acct_name, timeout_s, h))
    payload = {
        "account": acct_name,
        "name": name,
        "event": event,
        "async": async_,
        "idempotency_key": idempotency_key,
        "priority": priority,
    }
    # The link outlives the call's own timeout (plus queueing); the task kills itself.
    out = await st.links.call(h, "tasks.invoke", payload, timeout_s=max(30.0, 3 * timeout_s))
    out["id"] = f"{h}:{out['id']}"
    if async_:
        return JSONResponse(wire.CallAccepted(**out).model_dump(), status_code=202)
    return out


@router.get("/calls/{call_id}", response_model=wire.CallInfo)
async def get_call(
    call_id: str,
    request: Request,
    p: Auth,
    wait: Annotated[
        float | None, Query(ge=0, le=300, description="Wait up to N s for the end")
    ] = None,
) -> Any:
    st = state_of(request)
    host, sep, local = call_id.partition(":")
    if not sep or not local:
        raise NotFound(f"call {call_id} not found")
    payload = {"id": local, "account": None if p.admin else p.account_name, "wait_s": wait}
    try:
        out = await st.links.call(host, "tasks.call", payload, timeout_s=(wait or 0) + 30)
    except NotFound:
        raise NotFound(f"call {call_id} not found") from None
    out["id"] = call_id
    return out
