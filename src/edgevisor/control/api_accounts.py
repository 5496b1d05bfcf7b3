"""Accounts and tokens: ``/v1/accounts``, ``/v1/tokens``, ``/v1/whoami``.

Deleting an account. What the account owns falls in three kinds:

- *state that holds data or addresses* — domains (running or not: their volumes are on a
  host's disk), volumes, and addresses the account still holds (allocated, bound or
  preserved). Deleting the account would drop the rows and leave these on the hosts with
  nobody able to reach or free them, so the delete is refused (409, the objects listed in
  ``details``) until they are removed with their own commands;
- *networks* (logical address ranges, rows in the store only) go with the account, with
  their free-lists; addresses released but still in their hold-down end it early, each
  with a history row (:func:`edgevisor.network.pools.delete_account_networks`). The address
  history stays: it outlives addresses by design, and names the account. A new account of
  the same name starts without networks;
- *configuration on the agents* — tasks, devices (credentials, certificates), routes,
  timers, shadows, deployments. These cascade: the rows go with the account (foreign keys
  ``ON DELETE CASCADE``) and every host purges the account's objects (agent op
  ``devices.purge``: a deployment in flight is cancelled first, device certificates are
  revoked and connections closed, queued task calls fail, running ones finish).

A host that is unreachable must not keep the account's devices able to log in, so each
purge is recorded (event ``account.purge_pending``, one per host, in the same transaction
as the delete) and marked done (``account.purge_done``) when the host confirms; a host that
comes back fetches its pending purges (``GET /v1/hosts/{name}/purges``) and runs them
before it syncs or applies anything else.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgevisor.control.auth import (
    Principal,
    require_host,
    require_principal,
    state_of,
    token_cache,
)
from edgevisor.errors import Conflict, EdgevisorError, Forbidden, RequestError
from edgevisor.network.pools import HOLDING_STATES, delete_account_networks
from edgevisor.sdk import models as m
from edgevisor.store import repos
from edgevisor.store.domain_models import Domain
from edgevisor.store.models import Account, Event, Token
from edgevisor.store.network_models import AddressRecordRow
from edgevisor.store.volume_models import VolumeRecord

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]
HostAuth = Annotated[str, Depends(require_host)]
PURGE_PENDING = "account.purge_pending"
PURGE_DONE = "account.purge_done"


def _account_out(a: Account) -> m.Account:
    return m.Account(name=a.name, created_at=a.created_at)


def _token_out(t: Token, account: str | None) -> m.TokenInfo:
    return m.TokenInfo(
        id=t.id,
        name=t.name,
        account=account,
        admin=t.admin,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


@router.get("/whoami", response_model=m.Whoami)
def whoami(p: Auth) -> m.Whoami:
    return m.Whoami(
        kind="admin" if p.admin else "account", account=p.account_name, token_id=p.token_id
    )


@router.post("/accounts", response_model=m.Account, status_code=201)
def create_account(body: m.AccountCreate, p: Auth, request: Request) -> m.Account:
    p.require_admin()
    st = state_of(request)
    with st.store.session() as s:
        acct = repos.create_account(s, body.name, st.clock())
        out = _account_out(acct)
        repos.add_event(s, "account.created", st.clock(), subject=acct.name, account_id=acct.id)
    return out


@router.get("/accounts", response_model=list[m.Account])
def list_accounts(p: Auth, request: Request) -> list[m.Account]:
    st = state_of(request)
    with st.store.session() as s:
        rows = repos.list_accounts(s, None if p.admin else p.account_id or -1)
        return [_account_out(a) for a in rows]


@router.get("/accounts/{name}", response_model=m.Account)
def get_account(name: str, p: Auth, request: Request) -> m.Account:
    st = state_of(request)
    with st.store.session() as s:
        return _account_out(p.scope(repos.get_account(s, name)))


def _blockers(s: Session, acct: Account) -> dict[str, list[str]]:
    """What keeps an account from being deleted (see the module docstring)."""
    out = {
        "domains": sorted(s.scalars(select(Domain.name).where(Domain.account_id == acct.id))),
        "volumes": sorted(
            s.scalars(select(VolumeRecord.name).where(VolumeRecord.account_id == acct.id))
        ),
        "addresses": sorted(
            s.scalars(
                select(AddressRecordRow.logical).where(
                    AddressRecordRow.account == acct.name,
                    AddressRecordRow.state.in_(HOLDING_STATES),
                )
            )
        ),
    }
    return {k: v for k, v in out.items() if v}


@router.delete("/accounts/{name}", status_code=204)
async def delete_account(name: str, p: Auth, request: Request) -> None:
    p.require_admin()
    st = state_of(request)
    with st.store.session() as s:
        acct = repos.get_account(s, name)
        blockers = _blockers(s, acct)
        if blockers:
            what = "; ".join(f"{k}: {', '.join(v)}" for k, v in blockers.items())
            raise Conflict(
                f"account {name!r} still has {what}; remove them first", details=blockers
            )
        now = st.clock()
        # Networks first: it re-checks held addresses under the lock allocations take.
        networks = delete_account_networks(s, account=name, now=datetime.fromtimestamp(now, UTC))
        hosts = [h.name for h in repos.list_hosts(s)]
        repos.delete_account(s, acct)
        token_cache(request).clear()
        repos.add_event(s, "account.deleted", now, subject=name, data={"networks": networks})
        pending = {
            h: repos.add_event(s, PURGE_PENDING, now, subject=name, data={"host": h}).id
            for h in hosts
        }

    async def purge(host: str, event_id: int) -> None:
        try:
            await st.links.call(host, "devices.purge", {"account": name})
        except EdgevisorError as exc:  # the host purges when it is back
            log.info("account %s: purge on host %s deferred: %s", name, host, exc)
            return
        with st.store.session() as s:
            _purge_done(s, host, event_id, st.clock())

    await asyncio.gather(*(purge(h, e) for h, e in pending.items()))


def _purge_done(s: Session, host: str, event_id: int, now: float) -> None:
    repos.add_event(s, PURGE_DONE, now, subject=host, data={"pending": event_id, "host": host})


def _pending_purges(s: Session, host: str) -> list[dict[str, Any]]:
    done = {
        int(e.data.get("pending", -1))
        for e in s.scalars(select(Event).where(Event.kind == PURGE_DONE, Event.subject == host))
    }
    return [
        {"id": e.id, "account": e.subject}
        for e in s.scalars(select(Event).where(Event.kind == PURGE_PENDING).order_by(Event.id))
        if e.data.get("host") == host and e.id not in done
    ]


@router.get("/hosts/{name}/purges", include_in_schema=False)
def pending_purges(name: str, request: Request, host: HostAuth) -> list[dict[str, Any]]:
    """Accounts deleted while this host was unreachable, whose objects it must remove."""
    if name != host:
        raise Forbidden(f"host {host!r} may not act for host {name!r}")
    with state_of(request).store.session() as s:
        return _pending_purges(s, host)


@router.post("/hosts/{name}/purges/{event_id}/done", include_in_schema=False)
def purge_done(name: str, event_id: int, request: Request, host: HostAuth) -> dict[str, Any]:
    if name != host:
        raise Forbidden(f"host {host!r} may not act for host {name!r}")
    st = state_of(request)
    with st.store.session() as s:
        if any(p["id"] == event_id for p in _pending_purges(s, host)):
            _purge_done(s, host, event_id, st.clock())
    return {"ok": True}


@router.post("/tokens", response_model=m.TokenCreated, status_code=201)
def create_token(body: m.TokenCreate, p: Auth, request: Request) -> m.TokenCreated:
    st = state_of(request)
    with st.store.session() as s:
        if body.account is None:
            if p.admin:
                raise RequestError("the admin must name the account the token is for")
            target = s.get(Account, p.account_id)
            assert target is not None
        else:
            target = p.scope(repos.get_account(s, body.account))
        tok, secret = repos.create_token(s, name=body.name, now=st.clock(), account=target)
        info = _token_out(tok, target.name)
        repos.add_event(s, "token.created", st.clock(), subject=str(tok.id), account_id=target.id)
    return m.TokenCreated(**info.model_dump(), secret=secret)


@router.get("/tokens", response_model=list[m.TokenInfo])
def list_tokens(p: Auth, request: Request) -> list[m.TokenInfo]:
    st = state_of(request)
    with st.store.session() as s:
        names = {a.id: a.name for a in repos.list_accounts(s)}
        rows = repos.list_tokens(s, None if p.admin else p.account_id)
        return [_token_out(t, names.get(t.account_id or -1)) for t in rows]


@router.delete("/tokens/{token_id}", response_model=m.TokenInfo)
def revoke_token(token_id: int, p: Auth, request: Request) -> m.TokenInfo:
    st = state_of(request)
    with st.store.session() as s:
        tok = repos.revoke_token(s, token_id, st.clock(), None if p.admin else p.account_id)
        token_cache(request).clear()
        if tok.admin and not p.admin:
            raise Forbidden("only the admin can revoke an admin token")
        acct = s.get(Account, tok.account_id) if tok.account_id else None
        return _token_out(tok, acct.name if acct else None)
