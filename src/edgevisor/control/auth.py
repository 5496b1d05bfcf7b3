"""Bearer-token authentication and account scoping.

Every endpoint but ``/healthz`` depends on :func:`require_principal`. A principal is the
admin (sees every account) or one account (sees only its own objects; another account's
object is reported as not found, so names do not leak). Hosts authenticate separately with
their per-host credential (:func:`require_host`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from edgevisor.control.state import ControllerState
from edgevisor.errors import Forbidden, NotFound, RequestError, Unauthorized
from edgevisor.httpserver import bearer_token
from edgevisor.store import repos
from edgevisor.store.models import Account, Host


@dataclass(frozen=True)
class Principal:
    token_id: int
    admin: bool
    account_id: int | None
    account_name: str | None

    def require_admin(self) -> None:
        if not self.admin:
            raise Forbidden("this operation needs the admin token")

    def scope(self, account: Account) -> Account:
        """Return the account if the principal may see it; else NotFound (no leak)."""
        if self.admin or account.id == self.account_id:
            return account
        raise NotFound(f"account {account.name!r} not found")


def _bearer(request: Request) -> str:
    secret = bearer_token(request.headers.get("authorization", ""))
    if secret is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return secret


def state_of(request: Request) -> ControllerState:
    st: ControllerState = request.app.state.controller
    return st


class TokenCache:
    """Recently verified tokens, so a hot path does not query the store per request.

    Entries live ``ttl_s`` (a revoked token on another controller stops working within
    that time); a revocation through this controller drops the cache at once.
    """

    def __init__(self, ttl_s: float = 2.0, max_entries: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Principal]] = {}

    def get(self, secret: str) -> Principal | None:
        hit = self._entries.get(secret)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, secret: str, p: Principal) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[secret] = (time.monotonic() + self.ttl_s, p)

    def clear(self) -> None:
        self._entries.clear()


def token_cache(request: Request) -> TokenCache:
    cache: TokenCache | None = getattr(request.app.state, "token_cache", None)
    if cache is None:
        cache = request.app.state.token_cache = TokenCache()
    return cache


async def require_principal(request: Request) -> Principal:
    # Async, so that a cache hit costs no thread hop (FastAPI runs a sync dependency in
    # its thread pool: ~0.3 ms and a GIL handoff per request); only a miss goes to the
    # store, in a thread.
    secret = _bearer(request)
    cache = token_cache(request)
    cached = cache.get(secret)
    if cached is not None:
        return cached
    p = await run_in_threadpool(_lookup, request, secret)
    cache.put(secret, p)
    return p


def _lookup(request: Request, secret: str) -> Principal:
    st = state_of(request)
    with st.store.session() as s:
        tok = repos.token_by_secret(s, secret)
        if tok is None:
            raise Unauthorized("token is not valid or was revoked")
        name = None
        if tok.account_id is not None:
            acct = s.get(Account, tok.account_id)
            name = acct.name if acct else None
        return Principal(
            token_id=tok.id, admin=tok.admin, account_id=tok.account_id, account_name=name
        )


def acting_account(st: ControllerState, p: Principal, name: str | None) -> Account:
    """The account a request acts for: the named one (if visible) or the token's own.

    The admin has no account of its own, so it must name one (``?account=NAME``).
    """
    with st.store.session() as s:
        if name is None:
            if p.admin:
                raise RequestError("the admin must name the account (?account=NAME)")
            acct = s.get(Account, p.account_id)
            if acct is None:
                raise NotFound("account not found")
            return acct
        return p.scope(repos.get_account(s, name))


def require_host(request: Request) -> str:
    """Authenticate an agent by its per-host credential; returns the host name."""
    secret = _bearer(request)
    st = state_of(request)
    with st.store.session() as s:
        host: Host | None = repos.host_by_credential(s, secret)
        if host is None:
            raise Unauthorized("host credential is not valid; the host must join again")
        return host.name
