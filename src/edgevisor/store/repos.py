"""Repository functions for the platform tables; each takes an open Session.

They raise typed errors (NotFound, AlreadyExists, Unauthorized) and leave the transaction
to the caller, so a failure rolls back everything the request did.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgevisor.errors import AlreadyExists, NotFound, Unauthorized
from edgevisor.store.models import Account, Event, Host, JoinToken, Token

TOKEN_PREFIX = "evt_"
HOST_PREFIX = "evh_"
JOIN_PREFIX = "evj_"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# --- accounts -------------------------------------------------------------------------


def create_account(s: Session, name: str, now: float) -> Account:
    if s.scalar(select(Account).where(Account.name == name)) is not None:
        raise AlreadyExists(f"account {name!r} already exists")
    acct = Account(name=name, created_at=now)
    s.add(acct)
    try:
        s.flush()
    except IntegrityError as exc:  # a concurrent create won the race
        raise AlreadyExists(f"account {name!r} already exists") from exc
    return acct


def get_account(s: Session, name: str) -> Account:
    acct = s.scalar(select(Account).where(Account.name == name))
    if acct is None:
        raise NotFound(f"account {name!r} not found")
    return acct


def list_accounts(s: Session, only_id: int | None = None) -> Sequence[Account]:
    q = select(Account).order_by(Account.name)
    if only_id is not None:
        q = q.where(Account.id == only_id)
    return s.scalars(q).all()


def delete_account(s: Session, acct: Account) -> None:
    s.delete(acct)


# --- tokens ---------------------------------------------------------------------------


def create_token(
    s: Session, *, name: str, now: float, account: Account | None = None, admin: bool = False
) -> tuple[Token, str]:
    secret = new_secret(TOKEN_PREFIX)
    tok = Token(
        account_id=account.id if account else None,
        admin=admin,
        name=name,
        secret_sha256=digest(secret),
        created_at=now,
    )
    s.add(tok)
    s.flush()
    return tok, secret


def token_by_secret(s: Session, secret: str) -> Token | None:
    tok = s.scalar(select(Token).where(Token.secret_sha256 == digest(secret)))
    if tok is None or tok.revoked_at is not None:
        return None
    return tok


def list_tokens(s: Session, account_id: int | None = None) -> Sequence[Token]:
    q = select(Token).order_by(Token.id)
    if account_id is not None:
        q = q.where(Token.account_id == account_id)
    return s.scalars(q).all()


def revoke_token(s: Session, token_id: int, now: float, account_id: int | None = None) -> Token:
    tok = s.get(Token, token_id)
    if tok is None or (account_id is not None and tok.account_id != account_id):
        raise NotFound(f"token {token_id} not found")
    if tok.revoked_at is None:
        tok.revoked_at = now
    return tok


# --- hosts ----------------------------------------------------------------------------


def create_join_token(
    s: Session, now: float, ttl_s: float, host_name: str | None = None
) -> tuple[JoinToken, str]:
    secret = new_secret(JOIN_PREFIX)
    jt = JoinToken(
        secret_sha256=digest(secret), host_name=host_name, created_at=now, expires_at=now + ttl_s
    )
    s.add(jt)
    s.flush()
    return jt, secret


def spend_join_token(s: Session, secret: str, host_name: str, now: float) -> None:
    """Mark a join token used, atomically: of two agents racing, one wins."""
    jt = s.scalar(select(JoinToken).where(JoinToken.secret_sha256 == digest(secret)))
    if jt is None:
        raise Unauthorized("join token is not valid")
    if jt.used_at is not None:
        raise Unauthorized(f"join token was already used by host {jt.used_by!r}")
    if jt.expires_at < now:
        raise Unauthorized("join token has expired")
    if jt.host_name is not None and jt.host_name != host_name:
        raise Unauthorized(f"join token is for host {jt.host_name!r}, not {host_name!r}")
    res = s.execute(
        update(JoinToken)
        .where(JoinToken.id == jt.id, JoinToken.used_at.is_(None))
        .values(used_at=now, used_by=host_name)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise Unauthorized("join token was already used")


def register_host(
    s: Session,
    name: str,
    now: float,
    capacity: dict[str, Any],
    physical_address: str | None,
    endpoint: dict[str, Any] | None = None,
) -> tuple[Host, str]:
    """Create the host, or give an existing one a new credential (re-join)."""
    secret = new_secret(HOST_PREFIX)
    host = s.scalar(select(Host).where(Host.name == name))
    if host is None:
        host = Host(name=name, joined_at=now, credential_sha256=digest(secret))
        s.add(host)
    host.credential_sha256 = digest(secret)
    host.state = "up"
    host.state_changed_at = now
    host.last_heartbeat_at = now
    apply_capacity(host, capacity, physical_address, endpoint)
    s.flush()
    return host, secret


def apply_capacity(
    host: Host,
    capacity: dict[str, Any],
    physical_address: str | None,
    endpoint: dict[str, Any] | None = None,
) -> None:
    host.cpu_count = int(capacity.get("cpu_count", host.cpu_count or 0))
    host.memory_mb = int(capacity.get("memory_mb", host.memory_mb or 0))
    host.disk_mb = int(capacity.get("disk_mb", host.disk_mb or 0))
    host.agent_version = str(capacity.get("agent_version", host.agent_version or ""))
    if physical_address:
        host.physical_address = physical_address
    for key in ("agent_url", "agent_key"):
        value = (endpoint or {}).get(key)
        if value:
            setattr(host, key, value)


def host_by_credential(s: Session, secret: str) -> Host | None:
    return s.scalar(select(Host).where(Host.credential_sha256 == digest(secret)))


def get_host(s: Session, name: str) -> Host:
    host = s.scalar(select(Host).where(Host.name == name))
    if host is None:
        raise NotFound(f"host {name!r} not found")
    return host


def list_hosts(s: Session) -> Sequence[Host]:
    return s.scalars(select(Host).order_by(Host.name)).all()


def stale_hosts(s: Session, cutoff: float) -> Sequence[Host]:
    return s.scalars(
        select(Host).where(Host.state == "up", Host.last_heartbeat_at < cutoff)
    ).all()


# --- events ---------------------------------------------------------------------------


def add_event(
    s: Session,
    kind: str,
    now: float,
    *,
    subject: str = "",
    account_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    ev = Event(at=now, kind=kind, subject=subject, account_id=account_id, data=data or {})
    s.add(ev)
    s.flush()
    return ev


def events_after(
    s: Session, after_id: int, account_id: int | None, admin: bool, limit: int = 500
) -> Sequence[Event]:
    q = select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit)
    if not admin:
        q = q.where(Event.account_id == account_id)
    return s.scalars(q).all()


def last_event_id(s: Session) -> int:
    ev = s.scalar(select(Event).order_by(Event.id.desc()).limit(1))
    return ev.id if ev else 0
