"""Accounts and tokens: ``/v1/accounts``, ``/v1/tokens``, ``/v1/whoami``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from edgevisor.control.auth import Principal, require_principal, state_of, token_cache
from edgevisor.errors import Forbidden, RequestError
from edgevisor.sdk import models as m
from edgevisor.store import repos
from edgevisor.store.models import Account, Token

router = APIRouter(prefix="/v1")
Auth = Annotated[Principal, Depends(require_principal)]


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


@router.delete("/accounts/{name}", status_code=204)
def delete_account(name: str, p: Auth, request: Request) -> None:
    p.require_admin()
    st = state_of(request)
    with st.store.session() as s:
        acct = repos.get_account(s, name)
        repos.delete_account(s, acct)
        token_cache(request).clear()
        repos.add_event(s, "account.deleted", st.clock(), subject=name)


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
        repos.add_event(
            s, "token.created", st.clock(), subject=str(tok.id), account_id=target.id
        )
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
