"""Each API call described once, as data; the sync and async clients only execute them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from edgevisor.sdk import models as m

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None


def _one(model: type[T]) -> Callable[[Any], T]:
    adapter = TypeAdapter(model)
    return adapter.validate_python


def _many(model: type[T]) -> Callable[[Any], list[T]]:
    adapter: TypeAdapter[list[T]] = TypeAdapter(list[model])  # type: ignore[valid-type]
    return adapter.validate_python


def _none(_body: Any) -> None:
    return None


def health() -> Call[m.Health]:
    return Call("GET", "/healthz", _one(m.Health))


def whoami() -> Call[m.Whoami]:
    return Call("GET", "/v1/whoami", _one(m.Whoami))


def create_account(name: str) -> Call[m.Account]:
    return Call("POST", "/v1/accounts", _one(m.Account), json={"name": name})


def list_accounts() -> Call[list[m.Account]]:
    return Call("GET", "/v1/accounts", _many(m.Account))


def get_account(name: str) -> Call[m.Account]:
    return Call("GET", f"/v1/accounts/{name}", _one(m.Account))


def delete_account(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/accounts/{name}", _none)


def create_token(account: str | None = None, name: str = "default") -> Call[m.TokenCreated]:
    return Call(
        "POST", "/v1/tokens", _one(m.TokenCreated), json={"account": account, "name": name}
    )


def list_tokens() -> Call[list[m.TokenInfo]]:
    return Call("GET", "/v1/tokens", _many(m.TokenInfo))


def revoke_token(token_id: int) -> Call[m.TokenInfo]:
    return Call("DELETE", f"/v1/tokens/{token_id}", _one(m.TokenInfo))


def create_join_token(
    host: str | None = None, ttl_s: float | None = None
) -> Call[m.JoinTokenCreated]:
    return Call(
        "POST",
        "/v1/hosts/join-tokens",
        _one(m.JoinTokenCreated),
        json={"host": host, "ttl_s": ttl_s},
    )


def list_hosts() -> Call[list[m.Host]]:
    return Call("GET", "/v1/hosts", _many(m.Host))


def get_host(name: str) -> Call[m.Host]:
    return Call("GET", f"/v1/hosts/{name}", _one(m.Host))


def remove_host(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/hosts/{name}", _none)


def recent_events(after: int = 0) -> Call[list[m.EventRecord]]:
    return Call("GET", "/v1/events/recent", _many(m.EventRecord), params={"after": after})
