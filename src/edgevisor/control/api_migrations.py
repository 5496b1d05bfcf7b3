"""Migrations: ``/v1/migrations`` (start, list, show, abort) and a domain's migration.

Starting one admits it synchronously (unknown/down/same host, no room, unknown domain or
another account's, a domain already migrating: refused before anything changes) and
returns at once; the runner (:mod:`edgevisor.migration.runner`) drives it, and progress
shows here, on the SSE stream (``migration.*`` events) and in the CLI's progress bar.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from edgevisor.control.auth import Principal, acting_account, require_principal, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import NotFound
from edgevisor.migration.commands import Mode
from edgevisor.migration.runner import row_info, runner_for
from edgevisor.sdk import migrations as wire
from edgevisor.store import repos
from edgevisor.store.migration_models import MigrationRecord
from edgevisor.store.models import Account

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
AccountQ = Annotated[str | None, Query(description="Account (admin token only).")]


def _visible(st: ControllerState, p: Principal, migration_id: str) -> dict[str, Any]:
    """The migration as stored, if the caller may see it (NotFound otherwise)."""
    with st.store.session() as s:
        row = s.get(MigrationRecord, migration_id)
        if row is None or (not p.admin and row.account_id != p.account_id):
            raise NotFound(f"migration {migration_id!r} not found")
        account = s.get(Account, row.account_id)
        return row_info(row, account.name if account else "?")


def _live(st: ControllerState, stored: dict[str, Any]) -> wire.MigrationInfo:
    live = runner_for(st).lookup(str(stored["id"]))
    if live is not None:
        live["created_at"] = stored["created_at"]
    return wire.MigrationInfo.model_validate(live or stored)


@router.post("/migrations", response_model=wire.MigrationInfo, status_code=201)
async def start_migration(
    body: wire.MigrationCreate, request: Request, p: Auth, account: AccountQ = None
) -> wire.MigrationInfo:
    """Move a domain to another host (returns once admitted; poll or watch events)."""
    st = state_of(request)
    acct = await run_in_threadpool(acting_account, st, p, account)
    out = await runner_for(st).submit(
        acct, body.domain, body.to, mode=Mode(body.mode), rate_bytes_s=body.rate_bytes_s
    )
    return wire.MigrationInfo.model_validate(out)


@router.get("/migrations", response_model=list[wire.MigrationInfo])
def list_migrations(
    request: Request, p: Auth, account: AccountQ = None
) -> list[wire.MigrationInfo]:
    st = state_of(request)
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        q = select(MigrationRecord).order_by(MigrationRecord.created_at)
        if not p.admin:
            q = q.where(MigrationRecord.account_id == p.account_id)
        elif account is not None:
            q = q.where(MigrationRecord.account_id == repos.get_account(s, account).id)
        rows = [row_info(r, names.get(r.account_id, "?")) for r in s.scalars(q)]
    return [_live(st, r) for r in rows]


@router.get("/migrations/{migration_id}", response_model=wire.MigrationInfo)
def get_migration(migration_id: str, request: Request, p: Auth) -> wire.MigrationInfo:
    st = state_of(request)
    return _live(st, _visible(st, p, migration_id))


@router.post("/migrations/{migration_id}/abort", response_model=wire.MigrationInfo)
async def abort_migration(migration_id: str, request: Request, p: Auth) -> wire.MigrationInfo:
    """Roll back (the domain resumes on the source); refused after the commit."""
    st = state_of(request)
    await run_in_threadpool(_visible, st, p, migration_id)
    out = await runner_for(st).abort(migration_id)
    return wire.MigrationInfo.model_validate(out)


@router.get("/domains/{name}/migration", response_model=wire.MigrationInfo)
def domain_migration(
    name: str, request: Request, p: Auth, account: AccountQ = None
) -> wire.MigrationInfo:
    """The domain's current migration, or its last one."""
    st = state_of(request)
    acct = acting_account(st, p, account)
    with st.store.session() as s:
        row = s.scalar(
            select(MigrationRecord)
            .where(MigrationRecord.account_id == acct.id, MigrationRecord.domain == name)
            .order_by(MigrationRecord.created_at.desc())
            .limit(1)
        )
        if row is None:
            raise NotFound(f"domain {name!r} has no migration")
        stored = row_info(row, acct.name)
    return _live(st, stored)
